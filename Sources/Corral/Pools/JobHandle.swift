/// The handle of a job submitted to a ``WorkerPool``: its result, and a way to cancel it.
///
/// ```swift
/// let handle = try await pool.submit { try await render(page) }
/// let html = try await handle.value
/// ```
///
/// Dropping a handle does not cancel the job: the pool runs every job it accepted, and
/// reports how each ended in ``WorkerPool/stats``.
public struct JobHandle<Success: Sendable>: Sendable {
    let job: PoolJob<Success>

    /// The job's result, once it has ended.
    ///
    /// - Returns: What the job returned.
    /// - Throws: The job's own error; `CancellationError` when the job was cancelled (through
    ///   ``cancel()``, an immediate shutdown, or the cancellation of ``WorkerPool/run()``'s task)
    ///   and threw it, or never started; ``PoolError`` (code `.shutdown`) when an immediate
    ///   shutdown dropped it from the queue. When the *awaiting* task is cancelled, this throws
    ///   `CancellationError` (``TimeoutError`` when its deadline passed) and the job carries on.
    public var value: Success {
        get async throws {
            try await job.storage.result(of: job).get()
        }
    }

    /// Cancels the job: a queued job is removed and never runs; a running job's task is
    /// cancelled (the job observes `Task.isCancelled`). No effect once the job has ended.
    public func cancel() {
        job.storage.cancel(job)
    }
}

/// A job in a pool: its operation, where it is in its life, and who waits for its result.
///
/// Its life (`phase`) and the tasks awaiting its result (`waiters`) are guarded by the pool's
/// lock; the typed operation and result live in ``PoolJob``.
class PoolJobBase: @unchecked Sendable {
    // @unchecked Sendable: `storage` is immutable; `phase` and `waiters` are read and written
    // only with the owning pool's lock (`storage.state`) held.
    enum Phase {
        /// In the queue. A queued job that is cancelled through its handle ends at once and
        /// stays in the queue as a tombstone, skipped when it is popped.
        case queued
        case running(workerID: Int)
        case ended(JobEnd)
    }

    let storage: WorkerPoolStorage
    var phase = Phase.queued
    var waiters = WaiterQueue<Void, Bool>()

    init(storage: WorkerPoolStorage) {
        self.storage = storage
    }

    /// Runs the job on the calling worker and keeps its result (published under the pool's
    /// lock by the worker afterwards). Overridden by ``PoolJob``.
    func run() async -> JobEnd { preconditionFailure("PoolJobBase.run is abstract") }

    /// Ends a job that never ran with `error` (overridden by ``PoolJob``).
    func endWithoutRunning(_ error: any Error) { preconditionFailure("PoolJobBase.endWithoutRunning is abstract") }

    var isEnded: Bool {
        if case .ended = phase { return true }
        return false
    }
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
    // @unchecked Sendable: `operation` is read once, by the worker that runs the job;
    // `result` is written once — by that worker before it publishes the end under the pool's
    // lock, or under the lock for a job that never ran — and read only after that publication.
    private let operation: @isolated(any) () async throws -> Success
    private var result: Result<Success, any Error>?

    init(storage: WorkerPoolStorage, operation: @escaping @isolated(any) () async throws -> Success) {
        self.operation = operation
        super.init(storage: storage)
    }

    override func run() async -> JobEnd {
        do {
            result = .success(try await operation())
            return .completed
        } catch {
            result = .failure(error)
            return error is CancellationError && Task.isCancelled ? .cancelled : .failed
        }
    }

    override func endWithoutRunning(_ error: any Error) {
        result = .failure(error)
    }

    /// The published result. Call only once the job has ended.
    func publishedResult() -> Result<Success, any Error> {
        guard let result else { preconditionFailure("PoolJob: result read before the job ended") }
        return result
    }
}
