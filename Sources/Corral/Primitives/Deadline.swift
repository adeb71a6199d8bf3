/// The deadline that the current task runs under, set by ``withDeadline(_:_:)``
/// and ``withTimeout(_:_:)``.
///
/// Like Go's `ctx.Deadline()`: a library that makes its own timed calls (a network client,
/// a database driver) reads ``current`` and propagates it, so one deadline set at the top
/// of a request bounds everything beneath it.
///
/// ```swift
/// if let deadline = Deadline.current {
///     request.timeout = Deadline.timeRemaining ?? .zero
/// }
/// ```
public enum Deadline {
    /// The tightest deadline of the enclosing ``withDeadline(_:_:)`` and
    /// ``withTimeout(_:_:)`` scopes, or `nil` outside any.
    ///
    /// An inner scope never extends an outer one, so this is the earliest of them. Child
    /// tasks inherit it (it is a task-local value).
    public static var current: ContinuousClock.Instant? {
        DeadlineContext.scope?.deadline
    }

    /// The time left until ``current``, clamped at zero; `nil` outside any deadline scope.
    public static var timeRemaining: Duration? {
        guard let deadline = current else { return nil }
        return max(.zero, ContinuousClock.now.duration(to: deadline))
    }
}

/// Thrown when a deadline set by ``withDeadline(_:_:)`` or
/// ``withTimeout(_:_:)`` (or a `timeout:` argument) passes before the work is
/// done.
///
/// Distinct from `CancellationError`: a `CancellationError` means that someone cancelled
/// the task; a `TimeoutError` means that time ran out.
public struct TimeoutError: Error, Hashable, Sendable, CustomStringConvertible {
    /// The deadline that passed.
    public let deadline: ContinuousClock.Instant

    /// Creates an error for a passed deadline.
    public init(deadline: ContinuousClock.Instant) {
        self.deadline = deadline
    }

    public var description: String {
        let late = deadline.duration(to: .now)
        return "TimeoutError: the deadline passed \(late) ago"
    }
}

/// Runs `body` with a deadline `timeout` from now, and throws ``TimeoutError`` if it has not
/// finished by then.
///
/// Equivalent to `withDeadline(.now + timeout, body)`; see ``withDeadline(_:_:)``
/// for the full behaviour.
///
/// ```swift
/// let page = try await withTimeout(.seconds(5)) { try await fetch(url) }
/// ```
///
/// - Parameters:
///   - timeout: How long `body` may run. Zero or less means the deadline has already
///     passed: `body` is not run and ``TimeoutError`` is thrown at once.
///   - body: The work to bound in time.
/// - Returns: What `body` returns.
/// - Throws: ``TimeoutError`` when the deadline passes and `body` then throws (typically the
///   `CancellationError` the deadline caused); `CancellationError` when the calling task is
///   cancelled; otherwise whatever `body` throws.
@discardableResult
nonisolated(nonsending)
public func withTimeout<Success: Sendable>(
    _ timeout: Duration,
    _ body: sending @escaping @isolated(any) () async throws -> Success
) async throws -> Success {
    try await withDeadline(.now + timeout, body)
}

/// Runs `body` under `deadline`, and throws ``TimeoutError`` if it has not finished by then.
///
/// When the deadline passes, `body` is cancelled: every cancellable wait inside it
/// (`Task.sleep`, a Corral `acquire`, `send` or `receive`, an HTTP client that honours
/// cancellation) ends at once, and Corral's own waits throw ``TimeoutError`` rather than
/// `CancellationError`. ``Deadline/current`` returns the deadline inside `body` and in the
/// tasks it starts, so libraries can propagate it.
///
/// Deadlines nest: an inner scope whose deadline is later than an enclosing one's runs
/// under the enclosing deadline (it can never extend it).
///
/// - Important: Corral never abandons a task. If `body` ignores cancellation, this call
///   waits until `body` finishes: if it then returns a value, the value is returned (the
///   work was done, and discarding it could lose it); if it throws, ``TimeoutError`` is
///   thrown. A deadline bounds how long *cooperative* work runs, not a CPU loop that never
///   checks `Task.isCancelled`.
///
/// Cost: arming a deadline is a heap insertion in a process-wide timer (one thread, no
/// task per deadline); `body` runs in a task of its own that starts synchronously on the
/// calling thread, so a body that finishes without suspending never switches threads.
///
/// - Parameters:
///   - deadline: When `body` must be done. A deadline that has already passed means `body`
///     is not run and ``TimeoutError`` is thrown at once.
///   - body: The work to bound in time.
/// - Returns: What `body` returns.
/// - Throws: ``TimeoutError`` when the deadline passes and `body` then throws;
///   `CancellationError` when the calling task is cancelled (`body` is cancelled with it);
///   otherwise whatever `body` throws.
@discardableResult
nonisolated(nonsending)
public func withDeadline<Success: Sendable>(
    _ deadline: ContinuousClock.Instant,
    _ body: sending @escaping @isolated(any) () async throws -> Success
) async throws -> Success {
    guard ContinuousClock.now < deadline else {
        throw TimeoutError(deadline: deadline)
    }
    let enclosing = DeadlineContext.scope
    if let enclosing, enclosing.deadline <= deadline {
        // The enclosing deadline is at least as tight: it already cancels this task when it
        // passes, so the body can run right here, in this task.
        do {
            return try await body()
        } catch {
            if enclosing.isExpired { throw TimeoutError(deadline: enclosing.deadline) }
            throw error
        }
    }
    if Task.isCancelled {
        // Run the body in this (cancelled) task so it observes the cancellation from its
        // first instruction; no timer is needed.
        return try await DeadlineContext.$scope.withValue(DeadlineScope(deadline: deadline)) {
            try await body()
        }
    }

    let scope = TaskDeadlineScope<Success>(deadline: deadline)
    DeadlineTimer.shared.arm(scope)
    defer { DeadlineTimer.shared.disarm(scope) }
    // The body starts synchronously, right here, and runs until it first suspends. A
    // cancellation of the caller from now on reaches it through the handler below (one
    // that arrived before `attach` is applied by `attach`).
    let task = Task.immediate {
        try await DeadlineContext.$scope.withValue(scope) { try await body() }
    }
    scope.attach(task)
    return try await withTaskCancellationHandler {
        do {
            return try await task.value
        } catch {
            if scope.isExpired { throw TimeoutError(deadline: deadline) }
            throw error
        }
    } onCancel: {
        scope.cancel()
    }
}

/// Where the current task's tightest deadline lives.
@usableFromInline
enum DeadlineContext {
    @TaskLocal static var scope: DeadlineScope?

    /// The error a Corral wait throws when its task is cancelled: ``TimeoutError`` if the
    /// enclosing deadline has passed, `CancellationError` otherwise.
    ///
    /// Call it from the waiting task, after it has been resumed (task-locals are those of
    /// the current task, so not from inside a cancellation handler).
    @usableFromInline
    static func cancellationError() -> any Error {
        if let scope, scope.isExpired {
            return TimeoutError(deadline: scope.deadline)
        }
        return CancellationError()
    }
}

/// A deadline that cancels the task running a ``withDeadline(_:_:)`` body.
final class TaskDeadlineScope<Success: Sendable>: DeadlineScope, @unchecked Sendable {
    // @unchecked Sendable: `task` and `cancelRequested` are guarded by the deadline timer's
    // mutex (`DeadlineTimer.shared.withLock`), like the superclass's state.
    private var task: Task<Success, any Error>?
    private var cancelRequested = false

    /// Records the task running the body; cancels it at once if the deadline passed (or the
    /// caller was cancelled) before the task existed.
    func attach(_ task: Task<Success, any Error>) {
        let cancelNow = DeadlineTimer.shared.withLock {
            self.task = task
            return cancelRequested
        }
        if cancelNow { task.cancel() }
    }

    /// Cancels the body's task, now or as soon as it is attached.
    func cancel() {
        let task = DeadlineTimer.shared.withLock {
            cancelRequested = true
            return self.task
        }
        task?.cancel()
    }

    override func fire() {
        cancel()
    }
}
