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
/// - Important: Prefer ``withPermits(_:_:)``: it releases on every path. With
///   ``acquire(_:)`` the caller must ``release(_:)`` exactly what it acquired.
public final class AsyncSemaphore: Sendable {
    /// The number of permits the semaphore was created with.
    public let capacity: Int
    private let state: LockedState<SemaphoreStateMachine>

    /// Creates a semaphore with `permits` permits, all available.
    ///
    /// - Precondition: `permits > 0`.
    public init(permits: Int) {
        precondition(permits > 0, "AsyncSemaphore(permits:): permits must be greater than 0, got \(permits)")
        self.capacity = permits
        self.state = LockedState(SemaphoreStateMachine(capacity: permits))
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
    nonisolated(nonsending)
    public func acquire(_ permits: Int = 1) async throws {
        precondition(permits > 0, "AsyncSemaphore.acquire(_:): permits must be greater than 0, got \(permits)")
        switch state.withLock({ $0.acquireRequested(permits) }) {
        case .acquired:
            return
        case .exceedsCapacity:
            throw CapacityError(requested: permits, capacity: capacity, operation: "AsyncSemaphore.acquire")
        case .suspend(let id):
            let outcome = await state.suspend { state, continuation in
                state.waiterSuspended(id, continuation)
            } onCancel: { state in
                state.waiterCancelled(id)
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
        return state.withLock { $0.tryAcquire(permits) }
    }

    /// Returns `permits` permits, serving the waiters at the head of the line that now fit.
    ///
    /// - Precondition: The permits were acquired: releasing more than are held is a
    ///   programming error that stops the program with a message naming the numbers.
    public func release(_ permits: Int = 1) {
        precondition(permits > 0, "AsyncSemaphore.release(_:): permits must be greater than 0, got \(permits)")
        state.withLock { $0.permitsReleased(permits) }.resumeAll()
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
        state.withLock { $0.available }
    }

    /// The number of tasks waiting in line right now (a snapshot, for diagnostics).
    public var waiters: Int {
        state.withLock { $0.waiters.count }
    }
}
