/// Merges any number of asynchronous sequences into one: elements arrive as they are produced,
/// each source's in its own order — Go's fan-in of several channels into one.
///
/// ```swift
/// for try await event in merge([feedA, feedB, feedC, feedD]) {
///     handle(event)
/// }
/// ```
///
/// Unlike swift-async-algorithms' `merge(_:_:)` and `merge(_:_:_:)`, it takes a collection, so
/// there are no per-arity copies: merge 0, 1 or 100 sequences the same way. The sources are
/// of one type; to merge sequences of different types, send from a task per source into one
/// ``BoundedChannel`` (see the fan-out/fan-in article).
///
/// Each iteration starts one task per source on its first `next()`; the tasks are tracked
/// (and leak-checked by CorralTesting's `expectNoLeakedTasks`). They share a buffer of one
/// element per source: together the sources are at most that many elements ahead of the
/// consumer, plus one each waiting to be buffered, so backpressure reaches every source. The
/// slots are not reserved per source: a fast source may fill those that slower (or ended)
/// ones leave free.
///
/// ## Ending, errors and cancellation
/// - The merged sequence ends (`nil`) once every source has ended.
/// - The first error of any source ends it with that error at once (buffered elements are
///   dropped), and the other sources' iterations are cancelled.
/// - When the consuming task is cancelled, `next()` throws `CancellationError`
///   (``TimeoutError`` when an enclosing deadline passed) — at once if it waits, else on its
///   next call — and the sources' iterations are cancelled; so they are when the consumer
///   stops iterating early (drops the iterator).
///
/// - Parameter sequences: The sources.
/// - Returns: A sequence of every element of every source.
public func merge<Source: AsyncSequence & Sendable>(
    _ sequences: some Collection<Source>
) -> MergedSequence<Source> where Source.Element: Sendable {
    MergedSequence(sources: Array(sequences))
}

/// The sequence returned by ``merge(_:)``: every element of every source, as produced.
public struct MergedSequence<Source: AsyncSequence & Sendable>: AsyncSequence, Sendable where Source.Element: Sendable {
    /// The sources' element type.
    public typealias Element = Source.Element

    let sources: [Source]

    /// Starts an iteration: its sources are iterated from their start, by tasks started on
    /// the first `next()`.
    public func makeAsyncIterator() -> Iterator {
        Iterator(storage: MergeStorage(sources: sources))
    }

    /// Iterates a ``MergedSequence``. Dropping it cancels the sources' iterations.
    public struct Iterator: AsyncIteratorProtocol {
        let storage: MergeStorage<Source>

        /// The next element of any source, or `nil` once every source has ended.
        ///
        /// - Throws: The first error of any source; `CancellationError` (or ``TimeoutError``)
        ///   when the consuming task is cancelled (checked on every call).
        public mutating func next() async throws -> Element? {
            try await storage.next()
        }
    }
}

/// The state of one iteration of a merged sequence.
final class MergeStorage<Source: AsyncSequence & Sendable>: Sendable where Source.Element: Sendable {
    typealias Element = Source.Element

    private let sources: [Source]
    private let channel: BoundedChannel<Element>
    private let tasks: StreamTasks
    /// `started`: the producers were started; `running`: producers not yet finished;
    /// `finished`: the iteration has ended (returned nil or thrown).
    private let state = LockedState<(started: Bool, running: Int, finished: Bool)>((false, 0, false))

    init(sources: [Source]) {
        self.sources = sources
        self.channel = BoundedChannel(capacity: max(1, sources.count))
        self.tasks = StreamTasks(name: "merge", limit: sources.count)
    }

    deinit {
        // The consumer stopped (or finished): nothing may outlive the iteration for long.
        tasks.cancel()
        channel.close()
    }

    func next() async throws -> Element? {
        let (mustStart, finished) = state.withLock { state -> (Bool, Bool) in
            defer { state.started = true }
            if !state.started { state.running = sources.count }
            return (!state.started, state.finished)
        }
        if finished { return nil }
        // Also when an element is ready: a consumer slower than its sources never waits, and
        // must still stop when its task is cancelled.
        if Task.isCancelled { return try end(throwing: DeadlineContext.cancellationError()) }
        if mustStart { startProducers() }
        if let error = tasks.error { return try end(throwing: error) }
        do {
            guard let element = try await channel.receive() else {
                if let error = tasks.error { return try end(throwing: error) }
                return try end(throwing: nil)
            }
            // An error may have arrived while this element was buffered: it wins.
            if let error = tasks.error { return try end(throwing: error) }
            return element
        } catch {
            return try end(throwing: error)
        }
    }

    /// Ends the iteration: cancels the producers, then throws `error` (or returns `nil`).
    private func end(throwing error: (any Error)?) throws -> Element? {
        state.withLock { $0.finished = true }
        tasks.cancel()
        channel.close()
        if let error { throw error }
        return nil
    }

    private func startProducers() {
        guard !sources.isEmpty else {
            channel.close()
            return
        }
        for source in sources {
            tasks.start { [channel, tasks, state] in
                defer {
                    let last = state.withLock { state in
                        state.running -= 1
                        return state.running == 0
                    }
                    if last { channel.close() }
                }
                do {
                    for try await element in source {
                        do {
                            try await channel.send(element)
                        } catch {
                            return  // closed or cancelled: the iteration ended
                        }
                    }
                } catch {
                    if error is CancellationError && Task.isCancelled { return }
                    tasks.fail(error)
                    channel.close()
                }
            }
        }
    }
}
