extension AsyncSequence where Self: Sendable, Element: Sendable {
    /// Splits the sequence into `consumers` sequences that share it: each element goes to
    /// exactly one of them, whichever asks first — Go's channel read by several goroutines.
    ///
    /// ```swift
    /// let parts = jobs.fanOut(4)
    /// try await withErrorGroup { group in
    ///     for part in parts {
    ///         try await group.addTask {
    ///             for try await job in part { try await handle(job) }
    ///         }
    ///     }
    /// }
    /// ```
    ///
    /// On the first `next()` of any consumer, one task starts pulling the source into a buffer
    /// of `buffer` elements; the consumers take from that buffer. A consumer that stops asking
    /// holds nothing back: the others go on taking elements (the source is pulled only as
    /// fast as the consumers together take, and never more than `buffer` elements ahead, plus
    /// the one the feeder holds while it waits for room). The task is
    /// tracked (CorralTesting's `expectNoLeakedTasks` sees it).
    ///
    /// ## Ending, errors and cancellation
    /// - When the source ends, each consumer ends (`nil`) once the buffer is drained.
    /// - When the source throws, the consumers drain what is buffered (nothing already pulled
    ///   is lost), then each consumer's iteration throws that error.
    /// - A consumer whose task is cancelled throws `CancellationError` (or ``TimeoutError``)
    ///   and ends — at once if it waits, else on its next call (taking nothing); the others
    ///   are unaffected. An element handed to it at that instant is returned by it, never
    ///   lost.
    /// - Once every consumer sequence (and every iterator made from one) is gone, the task
    ///   pulling the source is cancelled.
    ///
    /// - Parameters:
    ///   - consumers: How many consumer sequences to make.
    ///   - buffer: The most elements pulled from the source and not yet taken by a consumer;
    ///     `nil` for `max(16, consumers)`; `0` hands each element straight from the source to
    ///     a waiting consumer.
    /// - Returns: `consumers` sequences sharing the source.
    /// - Precondition: `consumers > 0`, and `buffer >= 0` when given.
    public func fanOut(_ consumers: Int, buffer: Int? = nil) -> [FanOutSequence<Self>] {
        precondition(consumers > 0, "fanOut(_:): the number of consumers must be greater than 0, got \(consumers)")
        let capacity = buffer ?? Swift.max(16, consumers)
        precondition(capacity >= 0, "fanOut(_:buffer:): buffer must not be negative, got \(capacity)")
        let storage = FanOutStorage(base: self, capacity: capacity, consumers: consumers)
        return (0..<consumers).map { _ in FanOutSequence(consumer: FanOutConsumer(storage: storage)) }
    }
}

/// One of the sequences returned by `fanOut(_:buffer:)`: its share of the source's elements.
///
/// Iterating it from several tasks at once is allowed: they share its share, as consumers
/// of a channel do.
public struct FanOutSequence<Base: AsyncSequence & Sendable>: AsyncSequence, Sendable where Base.Element: Sendable {
    /// The source's element type.
    public typealias Element = Base.Element

    let consumer: FanOutConsumer<Base>

    /// Starts iterating this consumer's share.
    public func makeAsyncIterator() -> Iterator {
        Iterator(consumer: consumer)
    }

    /// Iterates a ``FanOutSequence``.
    public struct Iterator: AsyncIteratorProtocol {
        let consumer: FanOutConsumer<Base>
        var finished = false

        /// The next element for this consumer, or `nil` once the source has ended and the
        /// buffer is drained.
        ///
        /// - Throws: The source's error (after the buffered elements); `CancellationError` (or
        ///   ``TimeoutError``) when the consuming task is cancelled (checked on every call,
        ///   before taking an element). Either ends this iteration.
        public mutating func next() async throws -> Element? {
            guard !finished else { return nil }
            if Task.isCancelled {
                // Even with elements buffered: a consumer that never waits must still stop.
                finished = true
                throw DeadlineContext.cancellationError()
            }
            do {
                if let element = try await consumer.storage.next() { return element }
                finished = true
                return nil
            } catch {
                finished = true
                throw error
            }
        }
    }
}

/// Keeps the fan-out alive while a consumer sequence or one of its iterators exists.
final class FanOutConsumer<Base: AsyncSequence & Sendable>: Sendable where Base.Element: Sendable {
    let storage: FanOutStorage<Base>

    init(storage: FanOutStorage<Base>) {
        self.storage = storage
    }

    deinit {
        storage.consumerGone()
    }
}

/// The shared state of a fan-out: the source, the buffer, and the task that fills it.
final class FanOutStorage<Base: AsyncSequence & Sendable>: Sendable where Base.Element: Sendable {
    typealias Element = Base.Element

    private let base: Base
    private let channel: BoundedChannel<Element>
    private let tasks: StreamTasks
    /// Whether the feeder was started, and how many consumer handles are alive.
    private let state: LockedState<(started: Bool, consumers: Int)>

    init(base: Base, capacity: Int, consumers: Int) {
        self.base = base
        self.channel = BoundedChannel(capacity: capacity)
        self.tasks = StreamTasks(name: "fanOut", limit: 1)
        self.state = LockedState((false, consumers))
    }

    func next() async throws -> Element? {
        let mustStart = state.withLock { state in
            defer { state.started = true }
            return !state.started
        }
        if mustStart { startFeeder() }
        if let element = try await channel.receive() { return element }
        // Closed and drained: the source ended, or failed.
        if let error = tasks.error { throw error }
        return nil
    }

    /// A consumer handle is gone; when it was the last, stop pulling the source.
    func consumerGone() {
        let last = state.withLock { state in
            state.consumers -= 1
            return state.consumers == 0
        }
        if last {
            tasks.cancel()
            channel.close()
        }
    }

    private func startFeeder() {
        tasks.start { [base, channel, tasks] in
            do {
                for try await element in base {
                    do {
                        try await channel.send(element)
                    } catch {
                        return  // closed or cancelled: every consumer is gone
                    }
                }
                channel.close()
            } catch {
                if error is CancellationError && Task.isCancelled { return }  // every consumer is gone
                // The source's error (of any type). Record it before closing: a consumer that
                // finds the channel drained and closed must see it.
                tasks.fail(error)
                channel.close()
            }
        }
    }
}
