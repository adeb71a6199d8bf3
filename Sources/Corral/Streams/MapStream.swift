import Synchronization

extension AsyncSequence where Self: Sendable, Element: Sendable {
    /// Transforms the elements with up to `concurrency` transforms running at once — Go's
    /// fan-out to a fixed set of workers and fan-in of their results, as one operator.
    ///
    /// ```swift
    /// let thumbnails = photos.map(concurrency: 8) { try await render($0) }
    /// for try await thumbnail in thumbnails {
    ///     save(thumbnail)
    /// }
    /// ```
    ///
    /// Each iteration starts, on its first `next()`, one task that pulls the source and
    /// `concurrency` tasks that transform; they are tracked (and leak-checked by
    /// CorralTesting's `expectNoLeakedTasks`) and end with the iteration.
    ///
    /// ## Order and backpressure
    /// At most `buffer` elements are taken from the source and not yet returned by `next()`:
    /// waiting for a transform, being transformed, or transformed and waiting for the
    /// consumer. A slow consumer therefore slows the source down, and memory stays bounded.
    ///
    /// With `ordered: true` (the default) the results come in the order of the source.
    /// A slow element holds back the ones after it (head-of-line blocking): once `buffer`
    /// elements are in flight behind it, the source is not pulled until it is done. With
    /// `ordered: false` the results come as the transforms finish.
    ///
    /// ## Errors and cancellation
    /// - The first error of the source or of a transform ends the sequence with that error
    ///   at once (results not yet returned are dropped), and cancels the transforms still
    ///   running and the source's iteration.
    /// - When the consuming task is cancelled, `next()` throws `CancellationError`
    ///   (``TimeoutError`` when an enclosing deadline passed) and every task of the iteration
    ///   is cancelled: at once if it waits for a result, and otherwise within 64 results (a
    ///   consumer slower than its transforms never waits; it looks at its cancellation every
    ///   64 results). So the tasks are cancelled when the consumer stops iterating early
    ///   (drops its iterator).
    ///
    /// - Parameters:
    ///   - concurrency: The most transforms running at once. Must be greater than 0.
    ///   - ordered: Whether results keep the order of the source (`true`, the default) or
    ///     come in completion order.
    ///   - buffer: The most elements taken from the source and not yet returned by `next()`.
    ///     Must be greater than 0 and at most 16,777,216 (2²⁴); values below `concurrency`
    ///     limit the concurrency (no more transform tasks are started than `buffer`). The
    ///     default is `max(16, 4 × concurrency)`, at most 2²⁴.
    ///   - transform: The transform, called once per element, from several tasks at once.
    ///     It runs on the operator's worker tasks, off any actor (it is
    ///     `nonisolated(nonsending)` so that calling it costs no executor switch; a closure
    ///     isolated to an actor still runs on that actor).
    /// - Returns: A sequence of the transformed elements.
    @inlinable
    public func map<Transformed: Sendable>(
        concurrency: Int,
        ordered: Bool = true,
        buffer: Int? = nil,
        _ transform: nonisolated(nonsending) @escaping @Sendable (Element) async throws -> Transformed
    ) -> ConcurrentMapSequence<Self, Transformed> {
        ConcurrentMapSequence(
            base: self, concurrency: concurrency, ordered: ordered,
            window: concurrentWindow(concurrency: concurrency, buffer: buffer, in: "map"),
            transform: .plain(transform))
    }

    /// Transforms the elements with up to `concurrency` transforms running at once, and
    /// leaves out the `nil` results: `map(concurrency:ordered:buffer:_:)`'s fan-out and
    /// fan-in with a filter. Everything else — order, backpressure, errors, cancellation —
    /// is as `map(concurrency:ordered:buffer:_:)` describes.
    ///
    /// ```swift
    /// let profiles = userIDs.compactMap(concurrency: 8) { try await fetchProfile($0) }
    /// for try await profile in profiles {
    ///     index(profile)                                  // users without a profile are left out
    /// }
    /// ```
    ///
    /// - Parameters:
    ///   - concurrency: The most transforms running at once. Must be greater than 0.
    ///   - ordered: Whether results keep the order of the source (`true`, the default) or
    ///     come in completion order.
    ///   - buffer: The most elements taken from the source and not yet returned or left out.
    ///     Must be greater than 0 and at most 2²⁴; values below `concurrency` limit the
    ///     concurrency. The default is `max(16, 4 × concurrency)`, at most 2²⁴.
    ///   - transform: The transform; `nil` leaves the element out.
    /// - Returns: A sequence of the non-`nil` results.
    @inlinable
    public func compactMap<Transformed: Sendable>(
        concurrency: Int,
        ordered: Bool = true,
        buffer: Int? = nil,
        _ transform: nonisolated(nonsending) @escaping @Sendable (Element) async throws -> Transformed?
    ) -> ConcurrentMapSequence<Self, Transformed> {
        ConcurrentMapSequence(
            base: self, concurrency: concurrency, ordered: ordered,
            window: concurrentWindow(concurrency: concurrency, buffer: buffer, in: "compactMap"),
            transform: .optional(transform))
    }
}

/// Checks the arguments of the concurrent operators and returns the window.
@usableFromInline
func concurrentWindow(concurrency: Int, buffer: Int?, in function: String) -> Int {
    precondition(concurrency > 0, "\(function)(concurrency:): concurrency must be greater than 0, got \(concurrency)")
    let window = buffer ?? (concurrency > maximumConcurrentWindow / 4 ? maximumConcurrentWindow : Swift.max(16, 4 * concurrency))
    precondition(window > 0, "\(function)(concurrency:buffer:): buffer must be greater than 0, got \(window)")
    precondition(
        window <= maximumConcurrentWindow,
        "\(function)(concurrency:buffer:): buffer must be at most \(maximumConcurrentWindow) (its slots are allocated up front), got \(window)")
    return window
}

/// The largest `buffer` of the concurrent operators: each iteration allocates its slots up
/// front. The default buffer, `4 × concurrency`, is clamped to it. Also the largest
/// `Batcher` `maxSize`, for the same reason.
@usableFromInline
let maximumConcurrentWindow = 1 << 24

/// The sequence returned by `map(concurrency:ordered:buffer:_:)` and
/// `compactMap(concurrency:ordered:buffer:_:)`: the base sequence's elements, transformed
/// concurrently.
public struct ConcurrentMapSequence<Base: AsyncSequence & Sendable, Transformed: Sendable>: AsyncSequence, Sendable
where Base.Element: Sendable {
    /// The transformed element type.
    public typealias Element = Transformed

    @usableFromInline let base: Base
    @usableFromInline let concurrency: Int
    @usableFromInline let ordered: Bool
    @usableFromInline let window: Int
    @usableFromInline let transform: MapTransform<Base.Element, Transformed>

    @inlinable
    init(base: Base, concurrency: Int, ordered: Bool, window: Int, transform: MapTransform<Base.Element, Transformed>) {
        self.base = base
        self.concurrency = concurrency
        self.ordered = ordered
        self.window = window
        self.transform = transform
    }

    /// Starts an iteration: the base sequence is iterated from its start, by tasks started
    /// on the first `next()`.
    @inlinable
    public func makeAsyncIterator() -> Iterator {
        Iterator(inner: MapStreamIterator(
            MapStreamCore(base: base, concurrency: concurrency, window: window, ordered: ordered, stats: nil, transform: transform)))
    }

    /// Iterates a ``ConcurrentMapSequence``. Dropping it cancels the iteration's tasks.
    public struct Iterator: AsyncIteratorProtocol {
        @usableFromInline var inner: MapStreamIterator<Base, Transformed>

        @inlinable
        init(inner: MapStreamIterator<Base, Transformed>) {
            self.inner = inner
        }

        /// The next transformed element, or `nil` once every element has been transformed
        /// and returned.
        ///
        /// - Throws: The first error of the source or of a transform; `CancellationError`
        ///   (or ``TimeoutError``) when the consuming task is cancelled — at once if it
        ///   waits, otherwise within 64 results.
        @inlinable
        nonisolated(nonsending)
        public mutating func next() async throws -> Transformed? {
            try await inner.next()
        }

        /// The next transformed element; see ``next()``. Runs on the caller's isolation (no
        /// executor hop per element).
        @inlinable
        public mutating func next(isolation actor: isolated (any Actor)?) async throws -> Transformed? {
            // A ready result without a suspension point: inlined into the caller's loop, this
            // costs no executor switch (the await below does, even when it does not suspend).
            if let value = inner.handle.takeReady() { return value }
            return try await inner.next()
        }
    }
}

/// The consumer's side of one iteration of the concurrent-map engine (behind
/// ``ConcurrentMapSequence`` and ``PipelineStage``).
@usableFromInline
struct MapStreamIterator<Base: AsyncSequence & Sendable, Transformed: Sendable> where Base.Element: Sendable {
    @usableFromInline let handle: MapStreamHandle<Base, Transformed>
    @usableFromInline var finished = false

    @inlinable
    init(_ core: MapStreamCore<Base, Transformed>) {
        handle = MapStreamHandle(core)
    }

    @inlinable
    nonisolated(nonsending)
    mutating func next() async throws -> Transformed? {
        var yielded = false
        while !finished {
            if handle.untilCancellationCheck <= 0 {
                // Due (see `takeReady`, which takes nothing until this is reset — hence here,
                // in the loop: after 64 results left out in a row it would take nothing more):
                // a consumer that never waits must still stop when its task is cancelled.
                handle.untilCancellationCheck = MapStreamHandle<Base, Transformed>.cancellationCheckInterval
                if Task.isCancelled {
                    finish()
                    throw DeadlineContext.cancellationError()
                }
            }
            // Before anything else touches the core: binding it costs a retain and a
            // release, on a reference count the producers share.
            if let value = handle.takeReady() { return value }
            let core = handle.core
            let ticket = handle.ticket
            if !handle.started {
                // In the shared handle, not in this struct: a copy of the iterator must not
                // start a second set of tasks on the same state.
                handle.started = true
                core.start()
            }
            // Nothing ready: every credit goes back before the consumer decides to wait.
            core.returnCredits(handle)
            switch core.state.withLock({ $0.consumerCheck(ticket: ticket) }) {
            case .finished:
                finish()
                return nil
            case .failed(let error):
                finish()
                throw error
            case .wait:
                if Task.isCancelled {
                    finish()
                    throw DeadlineContext.cancellationError()
                }
                if !yielded {
                    yielded = true
                    await Task.yield()
                    continue
                }
                if let downstream = StreamDownstream.stageCounters.get() {
                    // This consumer is the lone worker of a pipeline stage: its wait here
                    // is that stage's wait for input.
                    let start = ContinuousClock.now
                    await core.consumerWait(ticket: ticket)
                    downstream.recordWaitingForInput(start.duration(to: .now))
                } else {
                    await core.consumerWait(ticket: ticket)
                }
            }
        }
        return nil
    }

    @inlinable
    mutating func finish() {
        finished = true
        handle.end()
    }
}

/// The consumer's side of one iteration: its position, and the end of the iteration when
/// the iterator is dropped.
@usableFromInline
final class MapStreamHandle<Base: AsyncSequence & Sendable, Transformed: Sendable> where Base.Element: Sendable {
    @usableFromInline let core: MapStreamCore<Base, Transformed>
    // Only the consuming task touches these (one `next()` at a time), so they skip the
    // dynamic exclusivity checks, which cost as much as the rest of the fast path.
    /// The ticket of the next result to return.
    @exclusivity(unchecked) @usableFromInline var ticket = 0
    /// Results returned (or left out) whose credits are not yet back with the feeder.
    @exclusivity(unchecked) @usableFromInline var returned = 0
    /// The iteration's tasks were started (on the first `next()`).
    @exclusivity(unchecked) @usableFromInline var started = false
    /// Results the fast path may still return before `next()` checks for cancellation.
    @exclusivity(unchecked) @usableFromInline var untilCancellationCheck = cancellationCheckInterval

    /// How many results the fast path returns between two looks at the consuming task's
    /// cancellation (one look per result would cost a few percent of a pipeline stage).
    @inlinable
    static var cancellationCheckInterval: Int { 64 }

    @inlinable
    init(_ core: MapStreamCore<Base, Transformed>) {
        self.core = core
    }

    /// The fast path of `next()`, without the lock: returns the next result if it is
    /// published and the iteration is not over (passing over left-out elements). A method
    /// of this class so that the core and the ring are reached without a retain: the
    /// producers retain and release the same objects, and every shared reference count
    /// touched per element is a cache line bouncing between the cores.
    @inlinable
    func takeReady() -> Transformed? {
        // Every `cancellationCheckInterval` results, leave it to `next()`'s slow path, which
        // looks at the task's cancellation first.
        guard untilCancellationCheck > 0 else { return nil }
        let ring = core.ring
        while !ring.isOver, let entry = ring.take(ticket) {
            untilCancellationCheck -= 1
            ticket += 1
            returned += 1
            if returned >= core.reportThreshold { core.returnCredits(self) }
            if let value = entry {
                core.cells?.recordEmitted()
                return value
            }
            core.cells?.recordLeftOut()
        }
        return nil
    }

    @inlinable
    func end() {
        core.consumerEnded(self)
    }

    deinit {
        core.consumerEnded(self)
    }
}

/// The transform of a concurrent map or a pipeline stage: the caller's closure as given.
/// Calling it through a wrapping closure (or a converted function value) would cost an
/// executor switch per element: under Swift 6's defaults a closure literal is a concurrent
/// function, which hops to the global executor when it is entered.
@usableFromInline
enum MapTransform<Element, Transformed>: Sendable {
    @usableFromInline typealias Plain = nonisolated(nonsending) @Sendable (Element) async throws -> Transformed
    @usableFromInline typealias Filtering = nonisolated(nonsending) @Sendable (Element) async throws -> Transformed?

    case plain(Plain)
    /// `nil` leaves the element out.
    case optional(Filtering)

    @inlinable
    nonisolated(nonsending)
    func callAsFunction(_ element: Element) async throws -> Transformed? {
        switch self {
        case .plain(let transform): try await transform(element)
        case .optional(let transform): try await transform(element)
        }
    }
}

@usableFromInline
enum StreamDownstream {
    /// The counters of the pipeline stage whose lone worker runs in this task, if any: a
    /// Corral upstream records its consumer's waits there as the stage's wait for input.
    /// (Spelled without the property wrapper so that inlinable code can use it.)
    @usableFromInline static let stageCounters = TaskLocal<StageCounters?>(wrappedValue: nil)
}

/// One iteration of the concurrent-map engine: the shared state, the result ring, the
/// feeder and the workers (see `MapStreamState` for the state machine and
/// `MapStreamRing` for the lock-free result path).
@usableFromInline
final class MapStreamCore<Base: AsyncSequence & Sendable, Transformed: Sendable>: Sendable where Base.Element: Sendable {
    @usableFromInline typealias Element = Base.Element

    @usableFromInline let state: LockedState<MapStreamState<Element>>
    @usableFromInline let ring: MapStreamRing<Transformed?>
    @usableFromInline let tasks: StreamTasks
    @usableFromInline let base: Base
    @usableFromInline let concurrency: Int
    @usableFromInline let window: Int
    /// Results in source order (tickets are indices) or in completion order.
    @usableFromInline let ordered: Bool
    /// How many returned results the consumer reports to the feeder at once: a quarter of
    /// the window (and everything before it waits).
    @usableFromInline let reportThreshold: Int
    @usableFromInline let transform: MapTransform<Element, Transformed>
    /// The pipeline stage's statistics, when the iteration is a stage's.
    @usableFromInline let stats: StageCounters?
    /// `stats`' counters, reached without a retain.
    @usableFromInline let cells: StageCells?

    @inlinable
    init(
        base: Base, concurrency: Int, window: Int, ordered: Bool, stats: StageCounters?,
        transform: MapTransform<Element, Transformed>
    ) {
        // More transforms than the window holds elements could never all be busy.
        let concurrency = Swift.min(concurrency, window)
        self.stats = stats
        self.cells = stats?.cells
        self.state = LockedState(MapStreamState(window: window, concurrency: concurrency))
        self.ring = MapStreamRing(window: window)
        self.tasks = StreamTasks(name: stats.map { "stage \"\($0.name)\"" } ?? "map(concurrency:)", limit: concurrency + 1)
        self.base = base
        self.concurrency = concurrency
        self.window = window
        self.ordered = ordered || concurrency == 1
        self.reportThreshold = Swift.max(1, window / 4)
        self.transform = transform
    }

    deinit {
        ring.deallocate()
    }

    /// Starts the feeder and the workers, or the lone worker.
    @inlinable
    func start() {
        // A lone worker is the downstream of the stage it pulls from: it says so through
        // `StreamDownstream.stageCounters` (stream tasks start without one).
        if concurrency == 1 {
            tasks.start { [self] in await StreamDownstream.stageCounters.withValue(stats) { await solo() } }
            return
        }
        tasks.start { [self] in await feed() }
        for _ in 0..<concurrency {
            tasks.start { [self] in await work() }
        }
    }

    // MARK: Producers

    /// The lone worker (`concurrency == 1`): pulls the source while the window has room,
    /// transforms, and publishes the result in the ring — no lock on the way.
    ///
    /// Its pull loop is `feed()`'s, written twice on purpose: sharing it through an async
    /// closure made pipeline.3stage ~15% slower (about 450 -> 520 ns per item).
    @inlinable
    func solo() async {
        var iterator = base.makeAsyncIterator()
        var fed = 0
        while true {
            if ring.isOver { return }
            if fed - ring.delivered >= window {
                guard await waitForRoom(fed: fed) else { return }
            }
            let element: Element?
            do {
                element = try await iterator.next()
            } catch {
                fail(error)
                return
            }
            guard let element else {
                sourceEnded(fed: fed)
                return
            }
            // Received (and in flight) from now: the transform may take long, and a hung
            // one must show.
            cells?.recordReceived()
            let value: Transformed?
            do {
                value = try await transform(element)
            } catch {
                cells?.recordDropped(1)
                fail(error)
                return
            }
            if let cells {
                // In flight until the consumer returns it, or dropped if the consumer ended
                // first: `consumerEnded` counts what it finds counted here (published or about
                // to be, and never taken), this what it did not. Counted before it is
                // published, so that the consumer cannot take it uncounted.
                let counted = ring.soloFed.pointee
                    .compareExchange(expected: fed, desired: fed + 1, ordering: .sequentiallyConsistent).exchanged
                if !counted { cells.recordDropped(1) }
            }
            publish(value, ticket: fed)
            fed += 1
        }
    }

    /// Publishes a result and wakes the consumer if it waits for it.
    @inlinable
    func publish(_ value: Transformed?, ticket: Int) {
        guard ring.publish(value, ticket: ticket) else { return }
        let consumer = state.withLock { state -> UnsafeContinuation<Void, Never>? in
            let waitsFor = ring.consumerWaitsFor
            guard waitsFor.pointee.load(ordering: .relaxed) == ticket, state.consumer != nil else { return nil }
            waitsFor.pointee.store(-1, ordering: .relaxed)
            return state.takeConsumer()
        }
        consumer?.resume()
    }

    /// Parks the feeder (or lone worker, which passes its count of elements) until the
    /// window has room. Returns false when the iteration is over.
    @inlinable
    func waitForRoom(fed soloFed: Int? = nil) async -> Bool {
        let start = cells.map { _ in ContinuousClock.now }
        // The wait counts as waiting for output only if results are waiting for downstream
        // when the feeder parks; otherwise the window is full of elements waiting for (or in)
        // this stage's own workers, and the stage itself is the bottleneck.
        var downstreamIsBehind = false
        let mayPull = await withUnsafeContinuation { continuation in
            let now = state.withLock { state -> Bool? in
                if let soloFed { state.fed = soloFed }
                if state.isOver { return false }
                let feederWaits = ring.feederWaitsFlag
                feederWaits.pointee.store(1, ordering: .sequentiallyConsistent)
                let delivered = ring.deliveredCounter.pointee.load(ordering: .sequentiallyConsistent)
                if state.fed - delivered < window {
                    feederWaits.pointee.store(0, ordering: .relaxed)
                    return true
                }
                // Results not yet taken by downstream: the consumer's ticket is behind the
                // newest result.
                downstreamIsBehind = ring.isPublished(delivered)
                state.feeder = continuation
                return nil
            }
            if let now { continuation.resume(returning: now) }
        }
        if let cells, let start, downstreamIsBehind { cells.recordWaitingForOutput(start.duration(to: .now)) }
        return mayPull
    }

    /// The source has ended after `fed` elements (a lone worker passes its count): wake the
    /// idle workers (to finish) and the consumer (if drained).
    @inlinable
    func sourceEnded(fed soloFed: Int? = nil) {
        let (workers, consumer) = state.withLock { state in
            if let soloFed { state.fed = soloFed }
            let waitsFor = ring.consumerWaitsFor.pointee.load(ordering: .relaxed)
            let woken = state.sourceEnded(consumerWaitsFor: waitsFor)
            if woken.consumer != nil { ring.consumerWaitsFor.pointee.store(-1, ordering: .relaxed) }
            return woken
        }
        for worker in workers { worker.resume(returning: true) }
        consumer?.resume()
    }

    /// The feeder: pulls the source while the window has room.
    @inlinable
    func feed() async {
        var iterator = base.makeAsyncIterator()
        var action = state.withLock { $0.feederMayPull(delivered: ring.delivered) }
        while true {
            switch action {
            case .stop:
                return
            case .wait:
                guard await waitForRoom() else { return }
                action = .pull
            case .pull:
                let element: Element?
                do {
                    element = try await iterator.next()
                } catch {
                    fail(error)
                    return
                }
                guard let element else {
                    sourceEnded()
                    return
                }
                let (worker, next) = state.withLock { state in
                    let (accepted, worker) = state.elementArrived(element)
                    if accepted { cells?.recordReceived() }
                    return (worker, accepted ? state.feederMayPull(delivered: ring.delivered) : .stop)
                }
                worker?.resume(returning: true)
                action = next
            }
        }
    }

    /// A worker: transforms elements from the input until the iteration is over or the
    /// source has ended and the input is empty.
    @inlinable
    func work() async {
        var batch: [(index: Int, element: Element)] = []
        batch.reserveCapacity(16)
        var wasWoken = false
        var yielded = false
        while true {
            let action = state.withLock { $0.workerTake(into: &batch, wasWoken: wasWoken) }
            wasWoken = false
            switch action {
            case .exit:
                return
            case .wait:
                if !yielded {
                    yielded = true
                    await Task.yield()
                    continue
                }
                let start = cells.map { _ in ContinuousClock.now }
                let again = await withUnsafeContinuation { continuation in
                    if let (continuation, again) = state.withLock({ $0.workerParked(continuation) }) {
                        continuation.resume(returning: again)
                    }
                }
                if let cells, let start { cells.recordWaitingForInput(start.duration(to: .now)) }
                guard again else { return }
                wasWoken = true
            case .work:
                for (index, element) in batch {
                    let value: Transformed?
                    do {
                        value = try await transform(element)
                    } catch {
                        fail(error)
                        return
                    }
                    publish(value, ticket: ordered ? index : ring.nextTicket())
                    // Over (the consumer left, or something failed): leave the rest of the
                    // chunk untransformed, as the transforms of other workers are cancelled.
                    if ring.isOver { return }
                }
                batch.removeAll(keepingCapacity: true)
                yielded = false
            }
        }
    }

    // MARK: Consumer

    /// Hands the credits of the results the consumer returned back to the feeder, and wakes
    /// it if it waits for them.
    @inlinable
    func returnCredits(_ handle: MapStreamHandle<Base, Transformed>) {
        let count = handle.returned
        guard count > 0 else { return }
        handle.returned = 0
        let delivered = ring.deliveredCounter
        delivered.pointee.add(count, ordering: .sequentiallyConsistent)
        let feederWaits = ring.feederWaitsFlag
        guard feederWaits.pointee.load(ordering: .sequentiallyConsistent) != 0 else { return }
        let feeder = state.withLock { state -> UnsafeContinuation<Bool, Never>? in
            guard let feeder = state.feeder, !state.isOver,
                  state.fed - delivered.pointee.load(ordering: .relaxed) < window
            else { return nil }
            state.feeder = nil
            feederWaits.pointee.store(0, ordering: .relaxed)
            return feeder
        }
        feeder?.resume(returning: true)
    }

    /// Parks the consumer until the result with `ticket` is published, the iteration is over
    /// or drained, or the consuming task is cancelled.
    @inlinable
    nonisolated(nonsending)
    func consumerWait(ticket: Int) async {
        await withTaskCancellationHandler {
            await withUnsafeContinuation { continuation in
                let parked = state.withLock { state -> Bool in
                    if state.consumerWasCancelled {
                        // Once: the caller checks its task's cancellation before it waits
                        // again (an iterator may go on in another task).
                        state.consumerWasCancelled = false
                        return false
                    }
                    if state.isOver || state.isDrained(at: ticket) { return false }
                    let waitsFor = ring.consumerWaitsFor
                    waitsFor.pointee.store(ticket, ordering: .sequentiallyConsistent)
                    if ring.isPublished(ticket) {
                        waitsFor.pointee.store(-1, ordering: .relaxed)
                        return false
                    }
                    state.consumer = continuation
                    return true
                }
                if !parked { continuation.resume() }
            }
        } onCancel: {
            consumerWoken { $0.consumerCancelled() }
        }
    }

    /// Takes the consumer's continuation (clearing the ticket it waits for) and resumes it.
    @inlinable
    func consumerWoken(_ take: (inout MapStreamState<Element>) -> UnsafeContinuation<Void, Never>?) {
        state.withLock { state -> UnsafeContinuation<Void, Never>? in
            let consumer = take(&state)
            if consumer != nil {
                ring.consumerWaitsFor.pointee.store(-1, ordering: .relaxed)
            }
            return consumer
        }?.resume()
    }

    /// Marks the iteration over for the lock-free paths (under the lock, as it becomes over).
    @inlinable
    func markOver(_ stop: MapStreamState<Element>.Stop) -> MapStreamState<Element>.Stop {
        ring.overFlag.pointee.store(1, ordering: .relaxed)
        if stop.consumer != nil {
            ring.consumerWaitsFor.pointee.store(-1, ordering: .relaxed)
        }
        ring.feederWaitsFlag.pointee.store(0, ordering: .relaxed)
        return stop
    }

    /// The source or a transform failed: the first error ends the iteration.
    @inlinable
    func fail(_ error: any Error) {
        guard let stop = state.withLock({ state in state.failed(error).map(markOver) }) else { return }
        stop.resume()
        tasks.cancel()
    }

    /// The consumer ended the iteration (finished, failed, cancelled or stopped early).
    @inlinable
    func consumerEnded(_ handle: MapStreamHandle<Base, Transformed>) {
        let unreported = handle.returned
        handle.returned = 0
        state.withLock { state in
            if let cells, !state.consumerHasEnded {
                // What was taken in and never passed on is no longer in flight. A lone
                // worker's count: what it published before now (it counts the rest).
                let fed = concurrency == 1
                    ? ring.soloFed.pointee.exchange(Int.min / 2, ordering: .sequentiallyConsistent)
                    : state.fed
                cells.recordDropped(fed - ring.delivered - unreported)
            }
            return markOver(state.consumerEnded())
        }.resume()
        tasks.cancel()
    }
}
