import Synchronization

/// A weighted, strictly first-come-first-served semaphore for Swift Concurrency — Go's
/// `golang.org/x/sync/semaphore.Weighted`.
///
/// Bounds how much of a resource concurrent tasks use at once: connections, memory, an
/// API quota where a heavy call costs more than a light one.
///
/// ```swift
/// let quota = AsyncSemaphore(permits: 100)
/// try await quota.withPermits(10) { try await callLightAPI() }
/// try await quota.withPermits(50) { try await callHeavyAPI() }
/// ```
///
/// ## Fairness
/// Waiters are served strictly in the order they arrived. A request at the head of the line
/// that does not fit blocks the requests behind it, even smaller ones that would fit: a
/// large request is never starved by a stream of small ones. A request for more permits
/// than ``capacity`` could never be granted and throws ``CapacityError`` at once.
///
/// ## Cancellation
/// A task cancelled while it waits throws `CancellationError` (``TimeoutError`` when the
/// enclosing deadline passed) and leaves no trace: it takes no permits and leaves the line,
/// and waiters behind it that now fit are served. If it was served at the same instant, it
/// returns normally and holds the permits.
///
/// Cancellation is observed only when a call has to wait: a cancelled task that finds the
/// permits free takes them without suspending (like a Go `select` on a ready channel), so
/// the uncontended path costs one atomic operation and no cancellation check.
///
/// - Important: Prefer ``withPermits(_:_:)``: it releases on every path. With
///   ``acquire(_:)`` the caller must ``release(_:)`` exactly what it acquired.
public final class AsyncSemaphore: Sendable {
    /// The number of permits the semaphore was created with.
    public let capacity: Int
    /// The fast path's view of the semaphore. While nobody waits (*fast mode*) it holds the
    /// available permits, and `acquire`/`release` are a single compare-and-swap on it, with
    /// no lock. While waiters exist (*slow mode*) it holds `-1` and every operation goes
    /// through `state`, whose `available` is then authoritative. Only `withState` switches
    /// modes, under the lock.
    @usableFromInline let fastPermits: Atomic<Int>
    private let state: LockedState<SemaphoreStateMachine>

    /// Creates a semaphore with `permits` permits, all available.
    ///
    /// - Precondition: `permits > 0`.
    public init(permits: Int) {
        precondition(permits > 0, "AsyncSemaphore(permits:): permits must be greater than 0, got \(permits)")
        self.capacity = permits
        self.fastPermits = Atomic(permits)
        self.state = LockedState(SemaphoreStateMachine(capacity: permits))
    }

    /// Takes `permits` in fast mode. Returns `false` when short of permits or in slow mode.
    @inlinable
    @inline(__always)
    func tryAcquireFast(_ permits: Int) -> Bool {
        var current = fastPermits.load(ordering: .relaxed)
        while current >= permits {
            let (exchanged, original) = fastPermits.weakCompareExchange(
                expected: current, desired: current - permits,
                successOrdering: .acquiring, failureOrdering: .relaxed
            )
            if exchanged { return true }
            current = original
        }
        return false
    }

    /// Runs `body` on the locked state machine, in slow mode.
    @inline(__always)
    private func withState<Result>(_ body: (inout SemaphoreStateMachine) -> Result) -> Result {
        state.withLock { inSlowMode(&$0, body) }
    }

    /// With the lock held: takes the permit count over from the fast path, runs `body`, and
    /// hands the count back to the fast path when no waiter is left.
    @inline(__always)
    private func inSlowMode<Result>(
        _ machine: inout SemaphoreStateMachine,
        _ body: (inout SemaphoreStateMachine) -> Result
    ) -> Result {
        let fast = fastPermits.exchange(-1, ordering: .acquiringAndReleasing)
        if fast >= 0 { machine.available = fast }
        let result = body(&machine)
        if machine.waiters.isEmpty {
            fastPermits.store(machine.available, ordering: .releasing)
        }
        return result
    }

    /// Acquires `permits` permits, waiting in line until they are available.
    ///
    /// Returns at once, without suspending, when nobody is waiting and the permits are free.
    ///
    /// - Parameter permits: How many permits to take; must be greater than 0.
    /// - Throws: ``CapacityError`` at once when `permits` is greater than ``capacity``; `CancellationError` when the task is cancelled while it
    ///   waits, or ``TimeoutError`` when an enclosing deadline passes — in both cases no
    ///   permit was taken.
    /// - Complexity: O(1), plus O(k) to wake the k waiters a release serves.
    @inlinable
    nonisolated(nonsending)
    public func acquire(_ permits: Int = 1) async throws {
        // The fast path is inlined into the caller: one compare-and-swap, no call.
        if permits > 0 && tryAcquireFast(permits) { return }
        try await acquireSlowly(permits)
    }

    @usableFromInline
    nonisolated(nonsending)
    func acquireSlowly(_ permits: Int) async throws {
        precondition(permits > 0, "AsyncSemaphore.acquire(_:): permits must be greater than 0, got \(permits)")
        if tryAcquireFast(permits) { return }
        switch withState({ $0.acquireRequested(permits) }) {
        case .acquired:
            return
        case .exceedsCapacity:
            throw CapacityError(requested: permits, capacity: capacity, operation: "AsyncSemaphore.acquire")
        case .suspend(let id):
            // Installing the continuation touches only the line, never the permit count, so it
            // needs no mode switch; a cancellation may grant permits and empty the line.
            let outcome = await state.suspend { machine, continuation in
                machine.waiterSuspended(id, continuation)
            } onCancel: { [self] machine in
                inSlowMode(&machine) { $0.waiterCancelled(id) }
            }
            switch outcome {
            case .acquired: return
            case .cancelled: throw DeadlineContext.cancellationError()
            }
        }
    }

    /// Acquires `permits` permits, waiting at most `timeout`.
    ///
    /// - Parameters:
    ///   - permits: How many permits to take; must be greater than 0.
    ///   - timeout: How long to wait. Zero or less: take them only if available now.
    /// - Throws: ``TimeoutError`` when the permits were not granted in time (none taken);
    ///   otherwise as ``acquire(_:)``.
    nonisolated(nonsending)
    public func acquire(_ permits: Int = 1, timeout: Duration) async throws {
        precondition(permits > 0, "AsyncSemaphore.acquire(_:timeout:): permits must be greater than 0, got \(permits)")
        if tryAcquire(permits) { return }
        if permits > capacity {
            throw CapacityError(requested: permits, capacity: capacity, operation: "AsyncSemaphore.acquire")
        }
        try await withTimeout(timeout) { try await self.acquire(permits) }
    }

    /// Acquires `permits` permits only if that needs no waiting.
    ///
    /// Like Go's `TryAcquire`, fails when other tasks are waiting even if enough permits are
    /// free: it never jumps the line.
    ///
    /// - Returns: `true` if the permits were taken (release them later), `false` otherwise.
    public func tryAcquire(_ permits: Int = 1) -> Bool {
        precondition(permits > 0, "AsyncSemaphore.tryAcquire(_:): permits must be greater than 0, got \(permits)")
        if tryAcquireFast(permits) { return true }
        guard fastPermits.load(ordering: .relaxed) < 0 else { return false }  // fast mode, short
        return withState { $0.tryAcquire(permits) }
    }

    /// Returns `permits` permits, serving the waiters at the head of the line that now fit.
    ///
    /// - Precondition: The permits were acquired: releasing more than are held is a
    ///   programming error that stops the program with a message naming the numbers.
    @inlinable
    public func release(_ permits: Int = 1) {
        // The fast path is inlined into the caller: one compare-and-swap, no call.
        let current = fastPermits.load(ordering: .relaxed)
        if permits > 0 && current >= 0 && permits <= capacity - current {
            let (exchanged, _) = fastPermits.weakCompareExchange(
                expected: current, desired: current + permits,
                successOrdering: .releasing, failureOrdering: .relaxed
            )
            if exchanged { return }
        }
        releaseSlowly(permits)
    }

    @usableFromInline
    func releaseSlowly(_ permits: Int) {
        precondition(permits > 0, "AsyncSemaphore.release(_:): permits must be greater than 0, got \(permits)")
        var current = fastPermits.load(ordering: .relaxed)
        while current >= 0 {
            precondition(
                permits <= capacity - current,
                "AsyncSemaphore.release(\(permits)): releasing more permits than were acquired (\(capacity - current) of \(capacity) are held)"
            )
            let (exchanged, original) = fastPermits.weakCompareExchange(
                expected: current, desired: current + permits,
                successOrdering: .releasing, failureOrdering: .relaxed
            )
            if exchanged { return }
            current = original
        }
        withState { $0.permitsReleased(permits) }.resumeAll()
    }

    /// Acquires `permits`, runs `body`, and releases them on every path: return, thrown
    /// error, cancellation.
    ///
    /// `body` runs on the caller's actor.
    ///
    /// - Parameters:
    ///   - permits: How many permits `body` needs; must be greater than 0.
    ///   - body: The work to run while holding the permits.
    /// - Returns: What `body` returns.
    /// - Throws: What ``acquire(_:)`` throws (then `body` does not run), or what `body`
    ///   throws.
    @discardableResult
    nonisolated(nonsending)
    public func withPermits<Result>(
        _ permits: Int = 1,
        _ body: nonisolated(nonsending) () async throws -> Result
    ) async throws -> Result {
        try await acquire(permits)
        defer { release(permits) }
        return try await body()
    }

    /// The permits free right now (a snapshot, for diagnostics).
    public var availablePermits: Int {
        let fast = fastPermits.load(ordering: .relaxed)
        return fast >= 0 ? fast : withState { $0.available }
    }

    /// The number of tasks waiting in line right now (a snapshot, for diagnostics).
    public var waiters: Int {
        guard fastPermits.load(ordering: .relaxed) < 0 else { return 0 }
        return withState { $0.waiters.count }
    }

    /// Identifies the waiter at the head of the line (for stall detection: the same value
    /// twice means the head was not served in between); nil when nobody waits.
    var headWaiterToken: UInt64? {
        guard fastPermits.load(ordering: .relaxed) < 0 else { return nil }
        return withState { $0.waiters.first?.id.generation }
    }
}
