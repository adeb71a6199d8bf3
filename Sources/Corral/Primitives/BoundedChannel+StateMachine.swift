import DequeModule

/// The state of a ``BoundedChannel``: the buffer, the line of parked senders and the line
/// of parked receivers.
///
/// Invariants (checked by the tests):
/// - `buffer.count <= capacity`;
/// - parked receivers exist only while the buffer is empty (a receiver never waits while an
///   element is available);
/// - parked senders exist only while the buffer is full (a sender never waits while there is
///   room); with `capacity == 0` the buffer is always empty and full, so senders wait for
///   receivers;
/// - after `close()`, no sender is parked, and no receiver is parked once the buffer is
///   empty.
///
/// Transitions:
///
/// | event                 | condition                      | effect |
/// |-----------------------|--------------------------------|--------|
/// | `sendRequested(e)`    | closed                         | `.closed` |
/// |                       | a receiver is parked           | hand `e` to the first receiver |
/// |                       | buffer has room                | append `e` |
/// |                       | otherwise                      | park the sender with `e` |
/// | `receiveRequested`    | buffer non-empty               | take the first element; move the first parked sender's element (if any) into the buffer and release that sender |
/// |                       | a sender is parked (rendezvous)| take its element and release it |
/// |                       | closed                         | `.finished` |
/// |                       | otherwise                      | park the receiver |
/// | `receiverCancelled`   | receiver parked                | it leaves the line with `.cancelled` |
/// |                       | already handed an element      | nothing: it returns that element |
/// | `senderCancelled`     | sender parked                  | it leaves the line with `.cancelled`, its element unsent |
/// |                       | already taken                  | nothing: the send succeeded |
/// | `closeRequested`      | —                              | parked senders fail with `.closed`; if the buffer is empty, parked receivers finish |
@usableFromInline
struct ChannelStateMachine<Element: Sendable> {
    @usableFromInline
    enum ReceiveOutcome: Sendable {
        case element(Element)
        case finished
        case cancelled
    }

    @usableFromInline
    enum SendOutcome: Sendable {
        case sent
        case closed
        case cancelled
    }

    @usableFromInline
    enum SendAction {
        /// Delivered (buffered or handed to a receiver, whose resumption comes with it).
        case sent(Resumption<ReceiveOutcome>?)
        case full
        case closed
    }

    @usableFromInline
    enum ReceiveAction {
        /// An element, and the resumption of the sender whose element took its place.
        case element(Element, Resumption<SendOutcome>?)
        case empty
        case finished
    }

    @usableFromInline let capacity: Int
    @usableFromInline var buffer: Deque<Element>
    @usableFromInline var receivers = WaiterQueue<Void, ReceiveOutcome>()
    @usableFromInline var senders = WaiterQueue<Element, SendOutcome>()
    @usableFromInline var isClosed = false

    @inlinable
    init(capacity: Int) {
        self.capacity = capacity
        self.buffer = Deque(minimumCapacity: capacity)
    }

    // MARK: Send

    /// A send that does not wait: `.full` means the caller must park (or give up).
    @inlinable
    mutating func sendRequested(_ element: Element) -> SendAction {
        if isClosed { return .closed }
        if let receiver = receivers.settleFirst(with: .element(element)) {
            return .sent(receiver.resumption)
        }
        if buffer.count < capacity {
            buffer.append(element)
            return .sent(nil)
        }
        return .full
    }

    /// Parks a sender whose `sendRequested` returned `.full`, in the same critical section.
    @inlinable
    mutating func senderParked(_ element: Element) -> WaiterID {
        senders.enqueue(element)
    }

    @inlinable
    mutating func senderSuspended(_ id: WaiterID, _ continuation: UnsafeContinuation<SendOutcome, Never>) -> Resumption<SendOutcome>? {
        senders.suspend(id, continuation: continuation)
    }

    @inlinable
    mutating func senderCancelled(_ id: WaiterID) -> Resumptions<SendOutcome> {
        senders.cancel(id, with: .cancelled)
    }

    // MARK: Receive

    /// A receive that does not wait: `.empty` means the caller must park (or give up).
    @inlinable
    mutating func receiveRequested() -> ReceiveAction {
        if let element = buffer.popFirst() {
            guard let sender = senders.settleFirst(with: .sent) else {
                return .element(element, nil)
            }
            buffer.append(sender.payload)
            return .element(element, sender.resumption)
        }
        if let sender = senders.settleFirst(with: .sent) {
            return .element(sender.payload, sender.resumption)
        }
        return isClosed ? .finished : .empty
    }

    /// Parks a receiver whose `receiveRequested` returned `.empty`, in the same critical
    /// section.
    @inlinable
    mutating func receiverParked() -> WaiterID {
        receivers.enqueue(())
    }

    @inlinable
    mutating func receiverSuspended(_ id: WaiterID, _ continuation: UnsafeContinuation<ReceiveOutcome, Never>) -> Resumption<ReceiveOutcome>? {
        receivers.suspend(id, continuation: continuation)
    }

    @inlinable
    mutating func receiverCancelled(_ id: WaiterID) -> Resumptions<ReceiveOutcome> {
        receivers.cancel(id, with: .cancelled)
    }

    // MARK: Close

    @inlinable
    mutating func closeRequested() -> (senders: Resumptions<SendOutcome>, receivers: Resumptions<ReceiveOutcome>) {
        var parkedSenders = Resumptions<SendOutcome>()
        var parkedReceivers = Resumptions<ReceiveOutcome>()
        guard !isClosed else { return (parkedSenders, parkedReceivers) }
        isClosed = true
        for sender in senders.settleAll(with: .closed) {
            parkedSenders.append(sender.resumption)
        }
        if buffer.isEmpty {
            for receiver in receivers.settleAll(with: .finished) {
                parkedReceivers.append(receiver.resumption)
            }
        }
        return (parkedSenders, parkedReceivers)
    }
}
