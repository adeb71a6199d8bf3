import Synchronization

/// The handle of a job submitted to a ``WorkerPool``: its result, and a way to cancel it.
///
/// ```swift
/// let handle = try await pool.submit { try await render(page) }
/// let html = try await handle.value
/// ```
///
/// Dropping a handle does not cancel the job: the pool ends every job it accepted — runs it,
/// or rejects it at an immediate shutdown — and reports how each ended in
/// ``WorkerPool/stats``.
public struct JobHandle<Success: Sendable>: Sendable {
    let job: PoolJob<Success>
    /// The pool. Held here rather than by the job: a job that holds its pool would retain it
    /// on the submitting thread and release it on a worker's, a reference count bouncing
    /// between cores on every job (measured, pool.throughput).
    let storage: WorkerPoolStorage

    /// The job's result, once it has ended.
    ///
    /// - Returns: What the job returned.
    /// - Throws: The job's own error (a job cancelled while running — through ``cancel()``, an
    ///   immediate shutdown, or the cancellation of ``WorkerPool/run()``'s task — typically
    ///   throws `CancellationError`); `CancellationError` when ``cancel()`` removed it before it
    ///   started; ``PoolError`` (code `.shutdown`) when an immediate shutdown dropped it before
    ///   it started. When the *awaiting* task is cancelled, this throws `CancellationError`
    ///   (``TimeoutError`` when its deadline passed) and the job carries on.
    public var value: Success {
        get async throws {
            try await storage.result(of: job).get()
        }
    }

    /// Cancels the job: a job that has not started is removed and never runs; a running
    /// job's task is cancelled (the job observes `Task.isCancelled`). No effect once the job
    /// has ended.
    public func cancel() {
        storage.cancel(job)
    }
}

/// A job in a pool.
///
/// Where it is (`placement`) and who waits for its result (`waiterList`) are guarded by the
/// pool's lock. Whether it runs is decided by `claim`, an atomic, because a worker starts the
/// jobs of its batch without taking the lock: the worker's compare-and-swap from `unclaimed`
/// to `running` races a cancellation's (or an immediate shutdown's) from `unclaimed` to
/// `dropped`, and exactly one wins.
class PoolJobBase: @unchecked Sendable {
    // @unchecked Sendable: `claim` is atomic; `placement` and
    // `waiterList` are read and written only with the owning pool's lock (`storage.state`) held;
    // `recordedEnd` is written by the one worker that won `claim`, before it takes that lock
    // to report, and read under the lock after that report.
    enum Placement {
        /// In the pool's queue. A job cancelled there ends at once and stays in the queue as
        /// a tombstone until popped.
        case queued
        /// Taken by a worker, in its batch (it may have started: see `claim`).
        case assigned(PoolWorker)
        case ended(JobEnd)
    }

    /// `claim` values.
    enum Claim {
        static let unclaimed: UInt8 = 0
        /// A worker started it.
        static let running: UInt8 = 1
        /// It ended without running (cancelled before it started, or rejected).
        static let dropped: UInt8 = 2
        /// It ran to its end.
        static let ran: UInt8 = 3
        /// It is running, and a cancellation is cancelling its worker's task.
        static let cancelling: UInt8 = 4
    }

    let claim = Atomic<UInt8>(Claim.unclaimed)
    /// Someone waits for the result: its worker publishes the end as soon as the job has run,
    /// not with its batch (see `WorkerPoolStateMachine.resultRequested`).
    let waited = Atomic<Bool>(false)
    var placement = Placement.queued
    /// Who waits for the result; created by the first waiter. Boxed because few jobs are
    /// waited for: inline, the queue's seven words made a job 145 bytes, above glibc's 128-byte
    /// fast bins, and every job freed on a worker then took the submitting thread's arena
    /// lock (measured, pool.throughput).
    var waiterList: JobWaiters?
    /// How the job ended when it ran: written by its worker before `markRan` (or before the
    /// cancellation that marked it `cancelling` is reported), read under the lock after the
    /// worker has reported its batch.
    var recordedEnd = JobEnd.completed

    init() {}

    /// Runs the job on the calling worker and keeps its result (published under the pool's
    /// lock by the worker afterwards), reporting it to the pool's `observer` if it has one.
    /// Overridden by ``PoolJob``.
    ///
    /// `nonisolated(nonsending)`, as `runWorker`: a concurrent function here would switch
    /// executors on entry and after every await, twice per job for nothing.
    nonisolated(nonsending)
    func run(observer: (any WorkerPoolObserver)?) async -> JobEnd { preconditionFailure("PoolJobBase.run is abstract") }

    /// Ends a job that never ran with `error` (overridden by ``PoolJob``).
    func endWithoutRunning(_ error: any Error) { preconditionFailure("PoolJobBase.endWithoutRunning is abstract") }

    /// Releases the closure of a job that ended without running, and with it what the closure
    /// captured (overridden by ``PoolJob``). Called once, by whoever dropped the job, after
    /// the pool's lock is released: the captures' deinits are user code, which may even
    /// release the pool itself (whose deinit takes the lock).
    func releaseOperation() { preconditionFailure("PoolJobBase.releaseOperation is abstract") }

    /// The waiter list, created if needed. Call with the pool's lock held.
    func waitersForEnqueue() -> JobWaiters {
        if let waiterList { return waiterList }
        let list = JobWaiters()
        waiterList = list
        return list
    }

    var isEnded: Bool {
        if case .ended = placement { return true }
        return false
    }

    /// A worker may start the job (it was not dropped).
    func claimForRunning() -> Bool {
        claim.compareExchange(expected: Claim.unclaimed, desired: Claim.running, ordering: .acquiring).exchanged
    }

    /// Keeps the job from ever starting; `false` if a worker started it first.
    func claimForDropping() -> Bool {
        claim.compareExchange(expected: Claim.unclaimed, desired: Claim.dropped, ordering: .acquiring).exchanged
    }

    /// The job ran to its end; `false` if a cancellation is cancelling its worker's task (the
    /// worker must then retire).
    func markRan() -> Bool {
        // Sequentially consistent: ordered with the `waited` flag (see `resultRequested`).
        claim.compareExchange(expected: Claim.running, desired: Claim.ran, ordering: .sequentiallyConsistent).exchanged
    }

    /// Someone waits for the result of this job, which has just been marked ran.
    var isWaitedFor: Bool {
        waited.load(ordering: .sequentiallyConsistent)
    }

    /// A cancellation may cancel the task running the job; `false` if it is not running.
    func claimForCancellingItsTask() -> Bool {
        claim.compareExchange(expected: Claim.running, desired: Claim.cancelling, ordering: .acquiringAndReleasing).exchanged
    }
}

/// The tasks waiting for a job's result (``JobHandle/value``).
final class JobWaiters: @unchecked Sendable {
    // @unchecked Sendable: `queue` is read and written only with the owning pool's lock held.
    var queue = WaiterQueue<Void, Bool>()
}

/// How a job ended, for the pool's accounting.
enum JobEnd: Sendable {
    case completed
    case failed
    case cancelled
    case rejected
}

/// A job with its typed operation and result.
final class PoolJob<Success: Sendable>: PoolJobBase, @unchecked Sendable {
    // @unchecked Sendable: `operation` is read once, by the worker that won `claim`, or
    // cleared once, by whoever won it to drop the job (after the pool's lock is released);
    // `value` and `error` are written once (one of them) — by that worker before it publishes
    // the end under the pool's lock, or under the lock for a job that never ran — and read
    // only after that publication.
    // `acceptedAt` is written once, at init.
    /// `nil` once the job was dropped without running, so that what it captured is released
    /// at once, not when the job is.
    private var operation: (@isolated(any) () async throws -> Success)?
    // Two fields rather than a `Result`: this code is not specialized for the user's
    // `Success`, and a generic `Result` costs a metadata lookup per job (measured, pool.throughput).
    private var value: Success?
    private var error: (any Error)?
    /// When the job was submitted, if the pool has an observer.
    private let acceptedAt: ContinuousClock.Instant?

    init(observed: Bool, operation: @escaping @isolated(any) () async throws -> Success) {
        self.operation = operation
        self.acceptedAt = observed ? .now : nil
        super.init()
    }

    nonisolated(nonsending)
    override func run(observer: (any WorkerPoolObserver)?) async -> JobEnd {
        let startedAt = acceptedAt == nil ? nil : ContinuousClock.now
        let end: JobEnd
        guard let operation else { preconditionFailure("PoolJob: a job that was dropped was run") }
        do {
            value = try await operation()
            end = .completed
        } catch {
            self.error = error
            end = error is CancellationError && Task.isCancelled ? .cancelled : .failed
        }
        if let observer, let acceptedAt, let startedAt {
            let outcome: WorkerPool.JobReport.Outcome = switch end {
            case .completed: .completed
            case .cancelled: .cancelled
            case .failed, .rejected: .failed
            }
            observer.jobEnded(WorkerPool.JobReport(
                outcome: outcome, waited: acceptedAt.duration(to: startedAt), ran: startedAt.duration(to: .now)
            ))
        }
        return end
    }

    override func endWithoutRunning(_ error: any Error) {
        self.error = error
    }

    override func releaseOperation() {
        operation = nil
    }

    /// The published result. Call only once the job has ended.
    func publishedResult() -> Result<Success, any Error> {
        if let error { return .failure(error) }
        guard let value else { preconditionFailure("PoolJob: result read before the job ended") }
        return .success(value)
    }
}

/// One worker of a pool. Guarded by the pool's lock, except `batch`'s jobs' `claim`.
final class PoolWorker: @unchecked Sendable {
    // @unchecked Sendable: every stored property is read and written only with the owning
    // pool's lock held.
    /// The worker's task, to cancel the job it runs; valid while the worker has not exited
    /// (it waits for `cancelsInFlight` to reach zero before it does).
    var task: UnsafeCurrentTask?
    /// The jobs taken from the queue in its last batch, not yet reported (less any another
    /// worker took over before they started).
    var batch: [PoolJobBase] = []
    /// It has taken a batch (possibly emptied by other workers taking its jobs over) that it
    /// has not reported yet.
    var holdsBatch = false
    var cancelsInFlight = 0
    /// A job of this worker's is being cancelled: its task is (being) cancelled for good, so
    /// the worker retires after that job.
    var mustRetire = false
}
