/// What a pipeline stage does when its transform throws.
public indirect enum StageErrorPolicy: Sendable {
    /// The pipeline ends with the error (the default): the consumer's `next()` throws it,
    /// and every stage's tasks are cancelled.
    case fail
    /// The element is left out: the error is counted (``StageStats/skipped``) and kept
    /// among the stage's ``PipelineStage/recentErrors``; the pipeline goes on.
    case skip
    /// The transform is tried again, up to `attempts` tries in all, waiting `backoff`
    /// before the second try and twice as long before each next one; if the last try
    /// fails, `then` decides: `.fail` (the default) or `.skip`. `attempts` must be at least
    /// 1 and `backoff` not negative. The waits are cancelled with the stage.
    case retry(attempts: Int, backoff: Duration, then: StageErrorPolicy = .fail)
}

extension AsyncSequence where Self: Sendable, Element: Sendable {
    /// Adds a stage to a pipeline: the elements are transformed by `concurrency` tasks of
    /// their own, with a bounded buffer between this stage and the next — Go's pipeline
    /// of goroutines joined by channels, with the element type free to change at each stage.
    ///
    /// ```swift
    /// let orders = rawOrders
    ///     .stage("validate") { try $0.validated() }                      // RawOrder -> Order
    ///     .stage("enrich", concurrency: 8, buffer: 50, onError: .skip) { try await enrich($0) }
    ///     .stage("price") { $0.priced() }                                 // -> PricedOrder
    /// for try await order in orders { try await store(order) }
    /// print(orders.pipelineStats)                                         // per stage
    /// ```
    ///
    /// Backpressure runs end to end: each stage takes at most `buffer` elements from
    /// upstream that it has not passed downstream, so a slow consumer slows every stage
    /// down to the source. A stage keeps the order of its input unless `ordered` is false.
    ///
    /// A stage runs (and counts, in ``PipelineStage/stats``) only while the pipeline is
    /// iterated: iterating the last stage starts every stage's tasks on the first `next()`;
    /// they are tracked (CorralTesting's `expectNoLeakedTasks` sees them) and end with the
    /// iteration.
    ///
    /// ## Errors and cancellation
    /// - A transform error is handled by `onError` (see ``StageErrorPolicy``); an error
    ///   that ends the pipeline reaches the consumer's `next()` at once, unwrapped.
    /// - An error of the source ends the pipeline.
    /// - Cancelling the consuming task while it waits makes `next()` throw
    ///   `CancellationError` (``TimeoutError`` under an expired deadline) and cancels every
    ///   stage; so does dropping the iterator (stopping early).
    ///
    /// - Parameters:
    ///   - name: The stage's name, in its statistics and errors.
    ///   - concurrency: How many elements the stage transforms at once. Must be greater
    ///     than 0. The default is 1.
    ///   - buffer: The most elements the stage takes from upstream and has not passed
    ///     downstream. Must be greater than 0 and at most 2²⁴; values below `concurrency`
    ///     limit the concurrency. The default is `max(16, 4 × concurrency)`, at most 2²⁴.
    ///   - ordered: Whether the stage keeps the order of its input (the default) or passes
    ///     results on as they are ready.
    ///   - onError: What to do when the transform throws. The default is ``StageErrorPolicy/fail``.
    ///   - transform: The stage's work on one element.
    /// - Returns: The pipeline up to and including this stage.
    @inlinable
    public func stage<Output: Sendable>(
        _ name: String,
        concurrency: Int = 1,
        buffer: Int? = nil,
        ordered: Bool = true,
        onError: StageErrorPolicy = .fail,
        _ transform: nonisolated(nonsending) @escaping @Sendable (Element) async throws -> Output
    ) -> PipelineStage<Self, Output> {
        PipelineStage(
            base: self, name: name, concurrency: concurrency,
            window: concurrentWindow(concurrency: concurrency, buffer: buffer, in: "stage"),
            ordered: ordered, policy: onError, transform: transform)
    }
}

/// A stage of a pipeline (see `stage(_:concurrency:buffer:ordered:onError:_:)`): the
/// upstream's elements, transformed by the stage's own tasks.
public struct PipelineStage<Base: AsyncSequence & Sendable, Output: Sendable>: AsyncSequence, Sendable
where Base.Element: Sendable {
    /// The stage's output type.
    public typealias Element = Output

    @usableFromInline let base: Base
    @usableFromInline let concurrency: Int
    @usableFromInline let window: Int
    @usableFromInline let ordered: Bool
    @usableFromInline let counters: StageCounters
    @usableFromInline let transform: MapTransform<Base.Element, Output>

    @inlinable
    init(
        base: Base, name: String, concurrency: Int, window: Int, ordered: Bool,
        policy: StageErrorPolicy, transform: nonisolated(nonsending) @escaping @Sendable (Base.Element) async throws -> Output
    ) {
        validate(policy, stage: name)
        let counters = StageCounters(name: name)
        self.base = base
        self.concurrency = concurrency
        self.window = window
        self.ordered = ordered
        self.counters = counters
        switch policy {
        case .fail:
            self.transform = .plain(transform)
        default:
            self.transform = .optional { element in
                try await applying(policy, attempt: 1, to: element, counters: counters, transform)
            }
        }
    }

    /// The stage's name.
    public var name: String { counters.name }

    /// The stage's counters now, added up over every iteration.
    public var stats: StageStats { counters.snapshot }

    /// The counters of every stage of the pipeline, from the first to this one.
    public var pipelineStats: [StageStats] {
        pipelineCounters.map(\.snapshot)
    }

    /// The counters of every stage of the pipeline, from the first to this one.
    var pipelineCounters: [StageCounters] {
        var counters = (base as? any PipelineStatsReporting)?.pipelineCounters ?? []
        counters.append(self.counters)
        return counters
    }

    /// The most recent errors this stage's policy handled by leaving an element out (the
    /// last 64; ``StageStats/skipped`` counts them all), oldest first.
    public var recentErrors: [StageError] { counters.recentErrors }

    /// Starts an iteration of the whole pipeline; its tasks start on the first `next()`.
    @inlinable
    public func makeAsyncIterator() -> Iterator {
        Iterator(inner: MapStreamIterator(
            MapStreamCore(base: base, concurrency: concurrency, window: window, ordered: ordered, stats: counters, transform: transform)))
    }

    /// Iterates a pipeline. Dropping it cancels every stage's tasks.
    public struct Iterator: AsyncIteratorProtocol {
        @usableFromInline var inner: MapStreamIterator<Base, Output>

        @inlinable
        init(inner: MapStreamIterator<Base, Output>) {
            self.inner = inner
        }

        /// The next output of the pipeline, or `nil` once the source has ended and every
        /// element has gone through.
        ///
        /// - Throws: The error that ended the pipeline (a source error, or a transform error
        ///   under the `.fail` policy); `CancellationError` (or ``TimeoutError``) when the
        ///   consuming task is cancelled while it waits.
        @inlinable
        nonisolated(nonsending)
        public mutating func next() async throws -> Output? {
            try await inner.next()
        }

        /// The next output of the pipeline; see ``next()``. Runs on the caller's isolation
        /// (no executor hop per element).
        @inlinable
        public mutating func next(isolation actor: isolated (any Actor)?) async throws -> Output? {
            // A ready result without a suspension point: inlined into the caller's loop, this
            // costs no executor switch (the await below does, even when it does not suspend).
            if let value = inner.handle.takeReady() { return value }
            return try await inner.next()
        }
    }
}

/// A pipeline stage that can list its pipeline's statistics.
protocol PipelineStatsReporting {
    var pipelineCounters: [StageCounters] { get }
}

extension PipelineStage: PipelineStatsReporting {}

@usableFromInline
func validate(_ policy: StageErrorPolicy, stage: String) {
    if case .retry(let attempts, let backoff, let then) = policy {
        precondition(attempts >= 1, "stage \"\(stage)\": .retry(attempts:) must be at least 1, got \(attempts)")
        precondition(backoff >= .zero, "stage \"\(stage)\": .retry(backoff:) must not be negative, got \(backoff)")
        if case .retry = then {
            preconditionFailure("stage \"\(stage)\": .retry(then:) must be .fail or .skip, not another .retry")
        }
    }
}

/// Runs `transform` on `element` under `policy`: the result, `nil` when the element is
/// left out, or the error that ends the pipeline.
@usableFromInline
func applying<Input, Output>(
    _ policy: StageErrorPolicy,
    attempt: Int,
    to element: Input,
    counters: StageCounters,
    _ transform: nonisolated(nonsending) @Sendable (Input) async throws -> Output
) async throws -> Output? {
    do {
        return try await transform(element)
    } catch {
        // The stage is being torn down: not the transform's failure.
        if Task.isCancelled && (error is CancellationError || error is TimeoutError) { throw error }
        return try await handle(error, under: policy, attempt: attempt, to: element, counters: counters, transform)
    }
}

@usableFromInline
func handle<Input, Output>(
    _ error: any Error,
    under policy: StageErrorPolicy,
    attempt: Int,
    to element: Input,
    counters: StageCounters,
    _ transform: nonisolated(nonsending) @Sendable (Input) async throws -> Output
) async throws -> Output? {
    switch policy {
    case .fail:
        throw error
    case .skip:
        counters.recordSkipped(StageError(stage: counters.name, error: error, attempts: attempt))
        return nil
    case .retry(let attempts, let backoff, let then):
        var attempt = attempt
        var lastError = error
        var pause = backoff
        while attempt < attempts {
            if pause > .zero { try await Task.sleep(for: pause) }
            pause = pause * 2
            attempt += 1
            counters.recordRetry()
            do {
                return try await transform(element)
            } catch {
                if Task.isCancelled && (error is CancellationError || error is TimeoutError) { throw error }
                lastError = error
            }
        }
        return try await handle(lastError, under: then, attempt: attempt, to: element, counters: counters, transform)
    }
}
