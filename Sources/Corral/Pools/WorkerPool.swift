#if canImport(Darwin)
import Darwin
#elseif canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A bounded pool of worker tasks fed by a bounded queue — Go's worker-pool pattern, with
/// backpressure, job handles, elastic sizing, and a shutdown that accounts for every job.
///
/// ```swift
/// let pool = WorkerPool(.init(workers: .fixed(10), queueCapacity: 100, name: "thumbnails"))
/// try await withErrorGroup { group in
///     try await group.addTask { try await pool.run() }          // the workers are its child tasks
///     let handle = try await pool.submit { try await render(image) }   // suspends while the queue is full
///     let thumbnail = try await handle.value
///     pool.shutdown(.graceful)                                   // finish what was accepted, then run() returns
/// }
/// ```
///
/// ## Lifecycle
/// Jobs may be submitted before ``run()`` starts: they queue. ``run()`` starts the workers as
/// its child tasks and returns once the pool is shut down and every worker has exited: no task
/// of the pool outlives it. ``shutdown(_:)`` is idempotent, safe to race with submitters, and
/// may be called before ``run()``:
/// - ``ShutdownMode/graceful``: stop accepting (waiting submitters are refused), run every
///   queued job, then ``run()`` returns. ``ShutdownMode/graceful(timeout:)`` becomes
///   immediate if ``run()`` has not returned in time.
/// - ``ShutdownMode/immediate``: stop accepting, cancel the running jobs, and fail every
///   queued job's handle with ``PoolError`` (code `.shutdown`). A running job that ignores
///   its cancellation runs to its end: ``run()`` waits for it, so that nothing outlives it.
///
/// Cancelling the task running ``run()`` is an immediate shutdown; ``run()`` then throws
/// `CancellationError`.
///
/// ## Accounting
/// Every job the pool accepts ends in exactly one of: completed, failed (its handle throws the
/// job's error), cancelled, or rejected at shutdown (its handle throws ``PoolError``). Once
/// ``run()`` has returned, `stats.submitted == completed + failed + cancelled + rejected`.
/// Refusals (``trySubmit(_:)`` on a full queue, submissions after shutdown) are counted apart
/// in ``Stats/refused``: those jobs were never accepted.
///
/// ## Context
/// Jobs run on the pool's workers, which are child tasks of ``run()``: they inherit the
/// task-local values and priority of the task running ``run()``, not of the submitter, and
/// run on the isolation of the closure submitted.
public final class WorkerPool: Sendable {
    /// The pool's configuration.
    public let configuration: Configuration
    let storage: WorkerPoolStorage

    /// Creates a pool; its workers start when ``run()`` is called.
    ///
    /// A pool released without having run (``run()`` holds the pool while it runs) shuts down
    /// immediately: the handles of the jobs it had queued throw ``PoolError`` (code
    /// `.shutdown`) rather than wait for ever. (A queued job whose closure captures the pool
    /// keeps it alive: then only ``shutdown(_:)`` ends those jobs.)
    public init(_ configuration: Configuration) {
        self.configuration = configuration
        self.storage = WorkerPoolStorage(configuration)
        DiagnosticsRegistry.shared.add(self, kind: "WorkerPool", name: configuration.name) { pool in
            let stats = pool.stats
            let finished = stats.completed + stats.failed + stats.cancelled + stats.rejected
            return StructureSample(
                tasks: stats.workers, waiting: stats.queued + stats.busy, held: stats.queued,
                progress: finished, stallToken: finished,
                details: [
                    "workers": stats.workers, "busy": stats.busy, "idle": stats.idle, "queued": stats.queued,
                    "submitted": stats.submitted, "completed": stats.completed, "failed": stats.failed,
                    "cancelled": stats.cancelled, "rejected": stats.rejected, "refused": stats.refused,
                    "peakQueued": stats.peakQueued, "peakBusy": stats.peakBusy,
                ]
            )
        }
    }

    deinit {
        // Nothing can run the jobs still queued, nor submit more: end them, so that no handle
        // waits for ever (a no-op once the pool has shut down).
        storage.shutdown(immediate: true)
    }

    /// The pool's name.
    public var name: String { configuration.name }

    /// Runs the workers until the pool is shut down and every worker has exited.
    ///
    /// Call it once, typically as a child task of the code that owns the pool (or as a
    /// `Service`'s `run()`).
    ///
    /// - Throws: `CancellationError` when the calling task is cancelled: the pool is shut down
    ///   immediately (running jobs cancelled, queued jobs rejected), and this throws once every
    ///   worker has exited.
    /// - Precondition: `run()` is called once in the pool's life.
    public func run() async throws {
        let storage = self.storage
        let initial = storage.state.withLock { $0.runStarted() }
        await withDiscardingTaskGroup { group in
            var toStart = initial
            while true {
                for _ in 0..<toStart {
                    let worker = PoolWorker()
                    let entry = LedgerEntry(kind: "WorkerPool", name: storage.name)
                    group.addTask {
                        defer { entry.close() }
                        await storage.runWorker(worker)
                    }
                }
                toStart = 0
                switch await storage.nextSupervisorEvent() {
                case .startWorkers(let count):
                    toStart = count
                case .cancelWorkers:
                    group.cancelAll()
                case .finished:
                    return
                }
            }
        }
        for escalation in storage.state.withLock({ state in
            defer { state.escalations.removeAll() }
            return state.escalations
        }) {
            DeadlineTimer.shared.disarm(escalation)
        }
        if Task.isCancelled { throw CancellationError() }
    }

    /// Submits a job, waiting while the queue is full.
    ///
    /// A full queue lets waiting submitters in once it has drained to half its capacity (a low
    /// watermark, so that a producer faster than the workers waits once per half a queue of
    /// jobs, not once per job); they are served in arrival order, and newcomers wait behind
    /// them.
    ///
    /// - Parameter operation: The job. It runs on a worker, on its own isolation.
    /// - Returns: The job's handle: await ``JobHandle/value`` for its result.
    /// - Throws: ``PoolError`` (code `.shutdown`) when the pool is shut down, before or while
    ///   waiting; `CancellationError` (or ``TimeoutError``) when the submitting task is cancelled
    ///   while it waits — in both cases the job was not accepted. A submitter given room at the
    ///   instant it is cancelled returns the handle.
    nonisolated(nonsending)
    public func submit<Success: Sendable>(
        _ operation: sending @escaping @isolated(any) () async throws -> Success
    ) async throws -> JobHandle<Success> {
        let job = PoolJob(observed: storage.observer != nil, operation: operation)
        switch storage.state.withLock({ $0.submitRequested(job, mayWait: true) }) {
        case .accepted(let worker, let supervisor):
            worker?.resume()
            supervisor?.resume()
            return JobHandle(job: job, storage: storage)
        case .refused, .queueFull:
            throw PoolError.shutdown(pool: name)
        case .suspend(let id, let supervisor):
            supervisor?.resume()
            let outcome = await storage.state.suspend { state, continuation in
                state.submitterSuspended(id, continuation)
            } onCancel: { state in
                state.submitterCancelled(id)
            }
            switch outcome {
            case .accepted: return JobHandle(job: job, storage: storage)
            case .refused: throw PoolError.shutdown(pool: name)
            case .cancelled: throw DeadlineContext.cancellationError()
            }
        }
    }

    /// Submits a job only if that needs no waiting.
    ///
    /// - Returns: The job's handle.
    /// - Throws: ``PoolError`` at once, without accepting the job: code `.queueFull` when no
    ///   worker is idle and the queue is full, or submitters are waiting for it to drain to its
    ///   low watermark; `.shutdown` when the pool is shut down.
    public func trySubmit<Success: Sendable>(
        _ operation: sending @escaping @isolated(any) () async throws -> Success
    ) throws -> JobHandle<Success> {
        let job = PoolJob(observed: storage.observer != nil, operation: operation)
        switch storage.state.withLock({ $0.submitRequested(job, mayWait: false) }) {
        case .accepted(let worker, let supervisor):
            worker?.resume()
            supervisor?.resume()
            return JobHandle(job: job, storage: storage)
        case .queueFull(let supervisor):
            supervisor?.resume()
            throw PoolError.queueFull(pool: name)
        case .refused:
            throw PoolError.shutdown(pool: name)
        case .suspend:
            preconditionFailure("WorkerPool.trySubmit: a submission that may not wait was parked")
        }
    }

    /// Shuts the pool down; see ``ShutdownMode``. Idempotent; an immediate shutdown after a
    /// graceful one escalates it.
    public func shutdown(_ mode: ShutdownMode = .graceful) {
        switch mode.base {
        case .immediate:
            storage.shutdown(immediate: true)
        case .graceful(let deadline):
            storage.shutdown(immediate: false)
            if let deadline {
                let escalation = EscalationScope(deadline: deadline, storage: storage)
                storage.state.withLock { $0.escalations.append(escalation) }
                DeadlineTimer.shared.arm(escalation)
            }
        }
    }

    /// A snapshot of the pool's counters.
    public var stats: Stats {
        storage.state.withLock { $0.snapshot }
    }
}

/// What a pool's workers, jobs and handles share: its state, behind one lock.
final class WorkerPoolStorage: Sendable {
    let name: String
    let state: LockedState<WorkerPoolStateMachine>
    let observer: (any WorkerPoolObserver)?

    init(_ configuration: WorkerPool.Configuration) {
        self.name = configuration.name
        self.observer = configuration.observer
        self.state = LockedState(WorkerPoolStateMachine(
            name: configuration.name,
            workers: configuration.workers,
            queueCapacity: configuration.queueCapacity
        ))
    }

    /// The supervisor (`run()`) waits for something to do. Cancelling `run()`'s task is an
    /// immediate shutdown.
    func nextSupervisorEvent() async -> WorkerPoolStateMachine.SupervisorEvent {
        await withTaskCancellationHandler {
            await withUnsafeContinuation { continuation in
                state.withLock { $0.supervisorWaits(continuation) }?.resume()
            }
        } onCancel: {
            shutdown(immediate: true)
        }
    }

    /// One worker: takes batches of jobs until the pool no longer needs it.
    ///
    /// `nonisolated(nonsending)` (it runs on its task's executor, the global one): as a
    /// concurrent function it switched executors after every job it awaited.
    nonisolated(nonsending)
    func runWorker(_ worker: PoolWorker) async {
        withUnsafeCurrentTask { task in
            state.withLock { $0.workerStarted(worker, task: task) }
        }
        var jobs: [PoolJobBase] = []
        work: while true {
            jobs = []  // let the state machine reuse the batch's storage
            var resumptions = PoolResumptions()
            let action = state.withLock { $0.workerReady(worker, into: &resumptions) }
            resumptions.resumeAll()
            switch action {
            case .run(let batch):
                jobs = batch
            case .runClaimed(let job):
                job.recordedEnd = await job.run(observer: observer)
                // If its handle is cancelling this task, the report retires us.
                if job.markRan() && job.isWaitedFor { publishNow(job) }
            case .park(let id, let idleTimeout):
                let timer = idleTimeout.map { IdleTimerScope(deadline: .now + $0, storage: self, waiter: id) }
                if let timer { DeadlineTimer.shared.arm(timer) }
                // Listed as idle already: yield once first, so that a job submitted meanwhile
                // is handed over without the cost of a park and a wake-up.
                await Task.yield()
                let outcome = await state.suspend { state, continuation in
                    state.workerSuspended(id, continuation)
                } onCancel: { state in
                    state.idleWorkerCancelled(id)
                }
                if let timer { DeadlineTimer.shared.disarm(timer) }
                switch outcome {
                case .batch(let batch):
                    var woke = PoolResumptions()
                    state.withLock { $0.workerWoke(into: &woke) }
                    woke.resumeAll()
                    jobs = batch
                case .exit:
                    break work
                }
            case .exit:
                break work
            }
            for job in jobs {
                guard job.claimForRunning() else { continue }  // cancelled or rejected meanwhile
                job.recordedEnd = await job.run(observer: observer)
                // A cancellation is cancelling this worker's task: report, then retire.
                guard job.markRan() else { break }
                if job.isWaitedFor { publishNow(job) }
            }
        }
        // A job cancellation may still be cancelling this task: wait for it before the task
        // ends (cancelling an ended task would touch freed memory). Rare and brief.
        while state.withLock({ $0.hasCancelsInFlight(worker) }) {
            sched_yield()
        }
        state.withLock { $0.workerExited(worker) }?.resume()
    }

    /// Publishes the end of a job someone waits for, without waiting for the batch's report.
    func publishNow(_ job: PoolJobBase) {
        state.withLock { $0.ranJobWaitedFor(job) }.resumeAll()
    }

    func shutdown(immediate: Bool) {
        state.withLock { $0.shutdownRequested(immediate: immediate) }.resumeAll()
    }

    /// The result of `job`, waiting until it has ended.
    nonisolated(nonsending)
    func result<Success: Sendable>(of job: PoolJob<Success>) async throws -> Result<Success, any Error> {
        let id: WaiterID
        switch state.withLock({ $0.resultRequested(job) }) {
        case .ended(let others):
            others.resumeAll()
            return job.publishedResult()
        case .wait(let waiter):
            id = waiter
        }
        let ended = await state.suspend { state, continuation in
            state.resultWaiterSuspended(job, id, continuation)
        } onCancel: { state in
            state.resultWaiterCancelled(job, id)
        }
        guard ended else { throw DeadlineContext.cancellationError() }
        return job.publishedResult()
    }

    func cancel(_ job: PoolJobBase) {
        switch state.withLock({ $0.cancelRequested(job) }) {
        case .none:
            return
        case .ended(let waiters, let submitters):
            waiters.resumeAll()
            submitters.resumeAll()
            job.releaseOperation()  // (this call dropped it; its captures go outside the lock)
        case .cancelTask(let task, let worker):
            task.cancel()
            state.withLock { $0.jobCancelDelivered(worker) }
        }
    }
}

/// Fires when an idle worker above the minimum has waited `idleTimeout` for a job.
final class IdleTimerScope: DeadlineScope, @unchecked Sendable {
    // @unchecked Sendable: every stored property is immutable.
    let storage: WorkerPoolStorage
    let waiter: WaiterID

    init(deadline: ContinuousClock.Instant, storage: WorkerPoolStorage, waiter: WaiterID) {
        self.storage = storage
        self.waiter = waiter
        super.init(deadline: deadline)
    }

    override func fire() {
        var resumptions = PoolResumptions()
        storage.state.withLock { $0.idleTimerFired(waiter, into: &resumptions) }
        resumptions.resumeAll()
    }
}

/// Turns a graceful shutdown into an immediate one when its deadline passes.
final class EscalationScope: DeadlineScope, @unchecked Sendable {
    // @unchecked Sendable: every stored property is immutable.
    let storage: WorkerPoolStorage

    init(deadline: ContinuousClock.Instant, storage: WorkerPoolStorage) {
        self.storage = storage
        super.init(deadline: deadline)
    }

    override func fire() {
        storage.shutdown(immediate: true)
    }
}
