/// The state of an ``AsyncSemaphore``: permits available and the line of waiters.
///
/// States and transitions (`available` is always in `0...capacity`):
///
/// | event                        | condition                                   | effect |
/// |------------------------------|---------------------------------------------|--------|
/// | `acquireRequested(n)`        | `n > capacity`                              | `.exceedsCapacity`, nothing changes |
/// |                              | line empty, `available >= n`                | `available -= n`, `.acquired` |
/// |                              | otherwise                                   | waiter joins the end of the line, `.suspend(id)` |
/// | `tryAcquire(n)`              | line empty, `n <= available`                | `available -= n`, `true` |
/// |                              | otherwise                                   | `false` |
/// | `waiterSuspended(id, c)`     | waiter still in line                        | continuation stored |
/// |                              | waiter settled meanwhile                    | resume `c` at once with its outcome |
/// | `permitsReleased(n)`         | `available + n > capacity`                  | precondition failure |
/// |                              | otherwise                                   | `available += n`, then grant |
/// | `waiterCancelled(id)`        | waiter in line                              | leaves the line (`.cancelled`), then grant |
/// |                              | waiter already served                       | nothing (it keeps its permits) |
///
/// *Grant*: while the first waiter's request fits in `available`, take its permits and
/// serve it. Strict FIFO: a request that does not fit blocks every request behind it, even
/// smaller ones that would fit (no starvation of large requests). Granting after a
/// cancellation is what keeps the waiters behind a cancelled head from sleeping forever
/// (Go issue #37852).
struct SemaphoreStateMachine {
    enum Outcome: Sendable {
        case acquired
        case cancelled
    }

    enum AcquireAction {
        case acquired
        case suspend(WaiterID)
        case exceedsCapacity
    }

    let capacity: Int
    /// Authoritative while waiters exist; `AsyncSemaphore` keeps it in step with its
    /// lock-free fast path otherwise.
    var available: Int
    private(set) var waiters = WaiterQueue<Int, Outcome>()

    init(capacity: Int) {
        self.capacity = capacity
        self.available = capacity
    }

    mutating func acquireRequested(_ permits: Int) -> AcquireAction {
        if waiters.isEmpty && permits <= available {
            available -= permits
            return .acquired
        }
        if permits > capacity {
            return .exceedsCapacity
        }
        return .suspend(waiters.enqueue(permits))
    }

    mutating func tryAcquire(_ permits: Int) -> Bool {
        guard waiters.isEmpty && permits <= available else { return false }
        available -= permits
        return true
    }

    mutating func waiterSuspended(_ id: WaiterID, _ continuation: UnsafeContinuation<Outcome, Never>) -> Resumption<Outcome>? {
        waiters.suspend(id, continuation: continuation)
    }

    mutating func permitsReleased(_ permits: Int) -> Resumptions<Outcome> {
        precondition(
            permits <= capacity - available,
            "AsyncSemaphore.release(\(permits)): releasing more permits than were acquired (\(capacity - available) of \(capacity) are held)"
        )
        available += permits
        var resumptions = Resumptions<Outcome>()
        grant(into: &resumptions)
        return resumptions
    }

    mutating func waiterCancelled(_ id: WaiterID) -> Resumptions<Outcome> {
        var resumptions = Resumptions<Outcome>()
        guard let cancelled = waiters.settle(id, with: .cancelled) else {
            return resumptions  // already served: the waiter keeps its permits and releases them
        }
        resumptions.append(cancelled.resumption)
        grant(into: &resumptions)
        return resumptions
    }

    private mutating func grant(into resumptions: inout Resumptions<Outcome>) {
        while let first = waiters.first, first.payload <= available {
            available -= first.payload
            resumptions.append(waiters.settleFirst(with: .acquired)?.resumption)
        }
    }
}
