/// Bounded fire-and-forget work that must outlive the request that started it, but not the
/// process — tokio's `TaskTracker`, with a limit and an error handler.
///
/// An HTTP handler that answers at once and records an audit event in the background is the
/// classic place where Go code launches goroutines without limits: under load their number
/// grows until the process runs out of memory, and at shutdown they are abandoned mid-write.
/// A tracker bounds them, counts them, reports their errors, and lets shutdown wait for them:
///
/// ```swift
/// let audits = TaskTracker(name: "audit", limit: 1_000)
///
/// // in a request handler
/// try await audits.spawn { try await auditLog.write(event) }    // suspends at 1,000 live tasks
///
/// // at shutdown
/// audits.close()              // no more spawns
/// try await audits.wait()     // every tracked task has finished
/// ```
///
/// Tasks are unstructured tasks, accounted for by the tracker: they inherit the spawner's
/// task-local values and priority — but not its deadline: the spawner's ``withDeadline(_:_:)``
/// does not cancel them, so ``Deadline/current`` is `nil` in them unless they set their
/// own — and run on the isolation of the closure passed in
/// (annotate it `@MainActor` to run there). A finished task's handle is dropped at once, so
/// the tracker's memory stays proportional to its live tasks, however many have run.
///
/// Errors thrown by tracked tasks go to the `onError` handler given at creation; without one
/// they are collected in ``errors`` (the most recent 1,000) and counted in ``errorCount``.
/// A `CancellationError` thrown by a task cancelled through ``cancelAll()`` is not reported.
public final class TaskTracker: Sendable {
    /// The tracker's name, used in diagnostics (leak reports).
    public let name: String
    /// The most tasks that may be live at once.
    public let limit: Int
    private let onError: (@Sendable (any Error) -> Void)?
    private let state: LockedState<TaskTrackerStateMachine>

    /// Creates an open tracker.
    ///
    /// - Parameters:
    ///   - name: A name for diagnostics.
    ///   - limit: The most tasks live at once; must be greater than 0.
    ///   - onError: Called (on the failing task) with every error a tracked task throws;
    ///     `nil` to collect them in ``errors``.
    public init(name: String = "TaskTracker", limit: Int, onError: (@Sendable (any Error) -> Void)? = nil) {
        precondition(limit > 0, "TaskTracker(limit:): limit must be greater than 0, got \(limit)")
        self.name = name
        self.limit = limit
        self.onError = onError
        self.state = LockedState(TaskTrackerStateMachine(limit: limit))
    }

    /// Starts `operation` as a tracked task, waiting while ``limit`` tasks are live.
    ///
    /// Spawners waiting for room are served in arrival order.
    ///
    /// - Throws: ``TaskTrackerError`` (code `.closed`) when the tracker is closed, before or
    ///   while waiting; `CancellationError` (or ``TimeoutError``) when the spawning task is
    ///   cancelled while it waits — in both cases the task was not started. If room was made
    ///   for it at the instant it was cancelled, the task is started and this returns normally.
    nonisolated(nonsending)
    public func spawn(
        priority: TaskPriority? = nil,
        _ operation: sending @escaping @isolated(any) () async throws -> Void
    ) async throws {
        let job = TrackedJob(operation: operation)
        switch state.withLock({ $0.spawnRequested() }) {
        case .admitted(let id):
            start(job, id: id, priority: priority)
        case .closed:
            throw TaskTrackerError.closed(name: name)
        case .suspend(let waiter):
            let outcome = await state.suspend { state, continuation in
                state.spawnerSuspended(waiter, continuation)
            } onCancel: { state in
                state.spawnerCancelled(waiter)
            }
            switch outcome {
            case .admitted(let id): start(job, id: id, priority: priority)
            case .closed: throw TaskTrackerError.closed(name: name)
            case .cancelled: throw DeadlineContext.cancellationError()
            }
        }
    }

    /// Starts `operation` as a tracked task only if that needs no waiting.
    ///
    /// - Returns: `false`, without starting it, when the tracker is closed or ``limit`` tasks
    ///   are live (or spawners are waiting).
    @discardableResult
    public func trySpawn(
        priority: TaskPriority? = nil,
        _ operation: sending @escaping @isolated(any) () async throws -> Void
    ) -> Bool {
        let job = TrackedJob(operation: operation)
        guard let id = state.withLock({ $0.trySpawnRequested() }) else { return false }
        start(job, id: id, priority: priority)
        return true
    }

    /// Stops accepting tasks. Idempotent.
    ///
    /// Spawners waiting for room fail with ``TaskTrackerError``; live tasks run on;
    /// ``wait()`` returns once they have finished.
    public func close() {
        let (refused, waiters) = state.withLock { $0.closeRequested() }
        refused.resumeAll()
        waiters.resumeAll()
    }

    /// Waits until the tracker is closed and every tracked task has finished.
    ///
    /// - Throws: `CancellationError` (or ``TimeoutError``) when the waiting task is
    ///   cancelled; the tracked tasks are not affected.
    nonisolated(nonsending)
    public func wait() async throws {
        guard let id = state.withLock({ $0.waitRequested() }) else { return }
        let finished = await state.suspend { state, continuation in
            state.waiterSuspended(id, continuation)
        } onCancel: { state in
            state.waiterCancelled(id)
        }
        if !finished { throw DeadlineContext.cancellationError() }
    }

    /// Cancels every live tracked task. Tasks spawned later are not affected.
    public func cancelAll() {
        for task in state.withLock({ $0.cancelAllRequested() }) {
            task.cancel()
        }
    }

    /// The number of live tasks (started or being started, not finished).
    public var count: Int {
        state.withLock { $0.live }
    }

    /// Whether ``close()`` has been called.
    public var isClosed: Bool {
        state.withLock { $0.isClosed }
    }

    /// The most recent errors thrown by tracked tasks (at most 1,000), oldest first, when no
    /// `onError` handler was given.
    public var errors: [any Error] {
        state.withLock { $0.errors }
    }

    /// How many errors tracked tasks have thrown in all, when no `onError` handler was given.
    public var errorCount: Int {
        state.withLock { $0.errorCount }
    }

    /// Handles currently held, for the test that memory stays flat (at most ``limit``).
    var heldHandles: Int {
        state.withLock { $0.handles.count }
    }

    /// Reads the state machine (tests).
    func stateForTesting<Value>(_ read: (TaskTrackerStateMachine) -> Value) -> Value {
        state.withLock { read($0) }
    }

    private func start(_ job: TrackedJob, id: UInt64, priority: TaskPriority?) {
        let entry = LedgerEntry(kind: "TaskTracker", name: name)
        // Only when the spawner runs under a deadline: binding a task-local keeps an extra
        // frame alive for the task's whole life (~1 KB a parked task, tasks.idle_memory).
        let dropsDeadline = DeadlineContext.scope != nil
        let task = Task(priority: priority) { [self] in
            defer {
                let (admitted, waiters) = state.withLock { $0.taskFinished(id) }
                entry.close()
                admitted?.resume()
                waiters.resumeAll()
            }
            do {
                if dropsDeadline {
                    try await job.runWithoutDeadline()
                } else {
                    try await job.operation()
                }
            } catch {
                if error is CancellationError && Task.isCancelled { return }
                if let onError {
                    onError(error)
                } else {
                    state.withLock { $0.taskFailed(error) }
                }
            }
        }
        if state.withLock({ $0.taskCreated(id, task) }) {
            task.cancel()
        }
    }
}

/// A tracked task's operation on its way to the task that runs it.
struct TrackedJob: @unchecked Sendable {
    // @unchecked Sendable: the closure was passed as `sending` (its region handed over) and
    // is called once, by the one task created for it.
    let operation: @isolated(any) () async throws -> Void

    /// Runs the operation outside the spawner's deadline: a tracked task outlives it, and the
    /// deadline's timer would never cancel this task anyway. A function of its own, so that
    /// its frames (the task-local binding's) exist only in the tasks that need them.
    @inline(never)
    func runWithoutDeadline() async throws {
        try await DeadlineContext.current.withValue(nil) {
            try await operation()
        }
    }
}
