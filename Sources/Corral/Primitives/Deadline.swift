import Synchronization

/// The deadline that the current task runs under, set by ``withDeadline(_:_:)``
/// and ``withTimeout(_:_:)``.
///
/// Like Go's `ctx.Deadline()`: a library that makes its own timed calls (a network client,
/// a database driver) reads ``current`` and propagates it, so one deadline set at the top
/// of a request bounds everything beneath it.
///
/// ```swift
/// if let remaining = Deadline.timeRemaining {
///     request.timeout = remaining   // the downstream call gives up when the caller would
/// }
/// ```
public enum Deadline {
    /// The tightest deadline of the enclosing ``withDeadline(_:_:)`` and
    /// ``withTimeout(_:_:)`` scopes, or `nil` outside any.
    ///
    /// An inner scope never extends an outer one, so this is the earliest of them. Child
    /// tasks inherit it (it is a task-local value); so do unstructured tasks (`Task { }`),
    /// which the deadline does not cancel, except the tasks of a ``TaskTracker`` and of
    /// Corral's stream operators, which start without one.
    ///
    /// A known limit: Corral cannot tell who cancelled a task. In an unstructured task that
    /// inherited a deadline which has since passed, a cancellation by its owner makes Corral's
    /// waits throw ``TimeoutError``, not `CancellationError`. Start such a task with
    /// `Task.detached` (which inherits no task-local value) when the difference matters.
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

    /// A readable description: how long ago the deadline passed.
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
///   `CancellationError` the deadline caused). When the calling task is cancelled, `body` is
///   cancelled with it and this throws what `body` then throws (typically
///   `CancellationError`). Otherwise whatever `body` throws.
@discardableResult
@inlinable
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
/// - Throws: ``TimeoutError`` when the deadline passes and `body` then throws. When the
///   calling task is cancelled, `body` is cancelled with it and this throws what `body` then
///   throws (typically `CancellationError`). Otherwise whatever `body` throws.
@discardableResult
@inlinable
nonisolated(nonsending)
public func withDeadline<Success: Sendable>(
    _ deadline: ContinuousClock.Instant,
    _ body: sending @escaping @isolated(any) () async throws -> Success
) async throws -> Success {
    guard ContinuousClock.now < deadline else {
        throw TimeoutError(deadline: deadline)
    }
    let enclosing = DeadlineContext.scope
    if let enclosing, enclosing.deadline <= deadline, enclosing.cancelsCurrentTask {
        // The enclosing deadline is at least as tight and cancels this very task when it
        // passes, so the body can run right here. (A task that merely inherited the scope —
        // a child task, or an unstructured one that the scope never cancels — arms its own.)
        do {
            return try await body()
        } catch {
            if enclosing.isExpired { throw TimeoutError(deadline: enclosing.deadline) }
            throw error
        }
    }
    // An inner scope never extends an enclosing one: a scope that cannot rely on the
    // enclosing scope's timer arms its own, at the earlier of the two deadlines.
    let effective = enclosing.map { Swift.min($0.deadline, deadline) } ?? deadline
    guard ContinuousClock.now < effective else {
        throw TimeoutError(deadline: effective)
    }
    if Task.isCancelled {
        // Run the body in this (cancelled) task so it observes the cancellation from its
        // first instruction; no timer is needed.
        return try await DeadlineContext.current.withValue(DeadlineScope(deadline: effective)) {
            try await body()
        }
    }

    let scope = TaskDeadlineScope(deadline: effective)
    let entry = LedgerEntry(kind: "Deadline", name: "withDeadline")
    // The body starts synchronously, right here, in a task of its own. That task arms the
    // deadline before running the body, so that even a body that never suspends is
    // cancelled when the deadline passes (it sees `Task.isCancelled`).
    let task = Task.immediate {
        defer { entry.close() }
        withUnsafeCurrentTask { scope.task = $0 }
        DeadlineTimer.shared.arm(scope)
        defer { scope.bodyReturned() }
        return try await DeadlineContext.current.withValue(scope) { try await body() }
    }
    defer { DeadlineTimer.shared.disarm(scope) }
    if scope.hasBodyReturned {
        // Finished without suspending: nothing can cancel it any more, so no need to
        // forward the caller's cancellation.
        return try await outcome(of: task, under: scope)
    }
    return try await withTaskCancellationHandler {
        try await outcome(of: task, under: scope)
    } onCancel: {
        task.cancel()
    }
}

/// The body's result, or ``TimeoutError`` if it failed after the deadline passed.
@inlinable
nonisolated(nonsending)
func outcome<Success: Sendable>(of task: Task<Success, any Error>, under scope: DeadlineScope) async throws -> Success {
    do {
        return try await task.value
    } catch {
        if scope.isExpired { throw TimeoutError(deadline: scope.deadline) }
        throw error
    }
}

/// Where the current task's tightest deadline lives.
@usableFromInline
enum DeadlineContext {
    /// The innermost scope, as a task-local value (spelled without the property wrapper
    /// so that inlinable code can bind it).
    @usableFromInline static let current = TaskLocal<DeadlineScope?>(wrappedValue: nil)

    /// The innermost scope of the current task, if any.
    @usableFromInline static var scope: DeadlineScope? { current.get() }

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
@usableFromInline
final class TaskDeadlineScope: DeadlineScope, @unchecked Sendable {
    // @unchecked Sendable: `task` is written once, by the body's task itself, before the
    // scope is armed (`DeadlineTimer.arm` takes the timer's mutex, which the timer thread
    // holds when it reads it), and only read afterwards; `returned` is atomic.
    //
    // Keeping the `UnsafeCurrentTask` past `withUnsafeCurrentTask` is sound here: the task
    // object stays alive as long as `withDeadline` holds its `Task` handle, and
    // `withDeadline` disarms the scope before it lets go of the handle — `disarm` returns
    // only once any `fire()` in progress has finished.
    @usableFromInline var task: UnsafeCurrentTask?
    @usableFromInline let returned = Atomic<Bool>(false)

    /// Called by the body's task when the body has returned or thrown.
    @usableFromInline
    func bodyReturned() {
        returned.store(true, ordering: .releasing)
    }

    /// Whether the body has returned or thrown.
    @usableFromInline
    var hasBodyReturned: Bool {
        returned.load(ordering: .acquiring)
    }

    override func fire() {
        task?.cancel()
    }

    /// Whether the current task is this scope's body task, while the body runs.
    ///
    /// Comparing the saved task with the current one is sound: while the body runs its task
    /// is alive, so no other task has its address; once the body has returned this is false.
    @usableFromInline
    override var cancelsCurrentTask: Bool {
        guard !hasBodyReturned, let task else { return false }
        return withUnsafeCurrentTask { $0 == task }
    }
}
