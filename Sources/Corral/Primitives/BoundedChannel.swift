/// A multi-producer, multi-consumer channel with a fixed buffer — Go's `make(chan T, n)`,
/// with backpressure, cancellation and a close that loses nothing.
///
/// ```swift
/// let jobs = BoundedChannel<Job>(capacity: 64)
/// // producers
/// try await jobs.send(job)            // suspends while the buffer is full
/// jobs.close()                        // no more sends; receivers drain what is buffered
/// // consumers
/// for try await job in jobs { try await handle(job) }
/// ```
///
/// ## Delivery
/// Each element reaches exactly one receiver, in the order it was sent (per sender).
/// Senders waiting for room and receivers waiting for elements are served first come,
/// first served. With `capacity == 0` the channel is a rendezvous: a send completes only
/// when a receiver takes the element.
///
/// ## Closing
/// ``close()`` stops new sends (they throw ``ChannelError`` carrying the element back);
/// senders waiting for room fail the same way, with their element; receivers still get every
/// buffered element, then `nil` (the `for try await` loop ends).
///
/// ## Cancellation
/// A waiting ``send(_:)`` or ``receive()`` whose task is cancelled throws
/// `CancellationError` (``TimeoutError`` when the enclosing deadline passed) and leaves no
/// trace. An element handed to a receiver at the same instant it is cancelled is returned by
/// that receiver, never dropped; a sender whose element was taken at that instant returns
/// normally. Cancellation is observed only when a call has to wait: a cancelled task whose
/// send or receive can complete at once completes it.
public final class BoundedChannel<Element: Sendable>: Sendable {
    /// How many elements the buffer holds; 0 for a rendezvous channel.
    public let capacity: Int
    @usableFromInline let state: LockedState<ChannelStateMachine<Element>>

    /// The result of ``trySend(_:)``.
    public enum TrySendResult: Hashable, Sendable {
        /// The element was buffered or handed to a waiting receiver.
        case enqueued
        /// The buffer is full (for a rendezvous channel: no receiver is waiting).
        case full
        /// The channel is closed.
        case closed
    }

    /// The result of ``tryReceive()``.
    public enum TryReceiveResult {
        /// The next element.
        case element(Element)
        /// Nothing is buffered, and the channel is still open.
        case empty
        /// The channel is closed and drained: nothing more will arrive.
        case closed
    }

    /// Creates a channel whose buffer holds `capacity` elements.
    ///
    /// - Parameter capacity: The buffer size; 0 makes a rendezvous channel.
    /// - Precondition: `capacity >= 0`.
    public init(capacity: Int) {
        precondition(capacity >= 0, "BoundedChannel(capacity:): capacity must be 0 or more, got \(capacity)")
        self.capacity = capacity
        self.state = LockedState(ChannelStateMachine(capacity: capacity))
    }

    /// Sends `element`, waiting while the buffer is full.
    ///
    /// Returns without suspending when a receiver is waiting or the buffer has room.
    ///
    /// - Throws: ``ChannelError`` (code `.closed`, with the element) when the channel is
    ///   closed, before or during the wait; `CancellationError` when the task is cancelled
    ///   while it waits, or ``TimeoutError`` when an enclosing deadline passes — in both
    ///   cases the element was not sent.
    /// - Complexity: O(1).
    @inlinable
    nonisolated(nonsending)
    public func send(_ element: Element) async throws {
        let action: (ChannelStateMachine<Element>.SendAction, WaiterID?) = state.withLock { state in
            let action = state.sendRequested(element)
            guard case .full = action else { return (action, nil) }
            return (action, state.senderParked(element))
        }
        switch action {
        case (.sent(let receiver), _):
            receiver?.resume()
        case (.closed, _):
            throw ChannelError.closed(element: element)
        case (.full, let id?):
            let outcome = await state.suspend { state, continuation in
                state.senderSuspended(id, continuation)
            } onCancel: { state in
                state.senderCancelled(id)
            }
            switch outcome {
            case .sent: return
            case .closed: throw ChannelError.closed(element: element)
            case .cancelled: throw DeadlineContext.cancellationError()
            }
        case (.full, nil):
            preconditionFailure("BoundedChannel.send: full without a parked sender")
        }
    }

    /// Sends `element` only if that needs no waiting.
    ///
    /// - Returns: ``TrySendResult/enqueued`` when the element was delivered;
    ///   ``TrySendResult/full`` or ``TrySendResult/closed`` when it was not (the caller
    ///   still has it).
    @inlinable
    public func trySend(_ element: Element) -> TrySendResult {
        switch state.withLock({ $0.sendRequested(element) }) {
        case .sent(let receiver):
            receiver?.resume()
            return .enqueued
        case .full:
            return .full
        case .closed:
            return .closed
        }
    }

    /// Receives the next element, waiting while the channel is empty.
    ///
    /// - Returns: The next element, or `nil` once the channel is closed and every buffered
    ///   element has been received.
    /// - Throws: `CancellationError` when the task is cancelled while it waits, or
    ///   ``TimeoutError`` when an enclosing deadline passes; no element is consumed.
    /// - Complexity: O(1).
    @inlinable
    nonisolated(nonsending)
    public func receive() async throws -> Element? {
        let action: (ChannelStateMachine<Element>.ReceiveAction, WaiterID?) = state.withLock { state in
            let action = state.receiveRequested()
            guard case .empty = action else { return (action, nil) }
            return (action, state.receiverParked())
        }
        switch action {
        case (.element(let element, let sender), _):
            sender?.resume()
            return element
        case (.finished, _):
            return nil
        case (.empty, let id?):
            let outcome = await state.suspend { state, continuation in
                state.receiverSuspended(id, continuation)
            } onCancel: { state in
                state.receiverCancelled(id)
            }
            switch outcome {
            case .element(let element): return element
            case .finished: return nil
            case .cancelled: throw DeadlineContext.cancellationError()
            }
        case (.empty, nil):
            preconditionFailure("BoundedChannel.receive: empty without a parked receiver")
        }
    }

    /// Receives the next element only if one is available now.
    @inlinable
    public func tryReceive() -> TryReceiveResult {
        switch state.withLock({ $0.receiveRequested() }) {
        case .element(let element, let sender):
            sender?.resume()
            return .element(element)
        case .empty:
            return .empty
        case .finished:
            return .closed
        }
    }

    /// Closes the channel. Idempotent.
    ///
    /// Later sends throw ``ChannelError``; senders waiting for room are resumed with
    /// ``ChannelError`` carrying their element; buffered elements are still delivered, after
    /// which receivers get `nil`.
    public func close() {
        let (senders, receivers) = state.withLock { $0.closeRequested() }
        senders.resumeAll()
        receivers.resumeAll()
    }

    /// Whether ``close()`` has been called.
    public var isClosed: Bool {
        state.withLock { $0.isClosed }
    }

    /// The number of buffered elements right now (a snapshot, for diagnostics).
    public var count: Int {
        state.withLock { $0.buffer.count }
    }

    /// The number of senders waiting for room right now (a snapshot, for diagnostics).
    public var waitingSenders: Int {
        state.withLock { $0.senders.count }
    }

    /// The number of receivers waiting for an element right now (a snapshot, for
    /// diagnostics).
    public var waitingReceivers: Int {
        state.withLock { $0.receivers.count }
    }

    /// Identifies the sender at the head of the line of senders waiting for room (for stall
    /// detection); nil when no sender waits.
    var headSenderToken: UInt64? {
        state.withLock { $0.senders.first?.id.generation }
    }
}

extension BoundedChannel.TryReceiveResult: Sendable {}

extension BoundedChannel: AsyncSequence {
    /// Receives the channel's elements until it is closed and drained.
    ///
    /// Several iterators (in several tasks) may consume the same channel: each element
    /// reaches exactly one of them. Iteration throws `CancellationError` (or
    /// ``TimeoutError``) when the consuming task is cancelled while it waits.
    public struct AsyncIterator: AsyncIteratorProtocol {
        @usableFromInline let channel: BoundedChannel

        @inlinable
        init(channel: BoundedChannel) {
            self.channel = channel
        }

        /// The next element, or `nil` once the channel is closed and drained.
        @inlinable
        public mutating func next() async throws -> Element? {
            try await channel.receive()
        }

        /// The next element, or `nil` once the channel is closed and drained.
        @inlinable
        public mutating func next(isolation actor: isolated (any Actor)?) async throws -> Element? {
            try await channel.receive()
        }
    }

    /// An iterator that receives from this channel.
    public func makeAsyncIterator() -> AsyncIterator {
        AsyncIterator(channel: self)
    }
}
