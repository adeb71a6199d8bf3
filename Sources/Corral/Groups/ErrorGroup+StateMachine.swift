import DequeModule

/// A task added to an error group, on its way to the worker that runs it.
struct GroupJob: @unchecked Sendable {
    // @unchecked Sendable: the closure was passed to `addTask` as `sending` — its region was
    // handed over, so no code in the adding task can reach what it captures — and it is
    // called exactly once, by the one worker that takes it.
    let operation: @isolated(any) () async throws -> Void
}

/// The state of a limited error group: the workers, the queue of added tasks, the adders
/// waiting for room, and the errors.
///
/// A limited group runs its tasks on at most `limit` *worker* tasks that it starts lazily and
/// reuses: a worker runs a task, then takes the next from the queue, and parks when there is
/// none. The queue holds at most `pendingCapacity` tasks (`max(limit, 256)`); `addTask`
/// suspends beyond that. `tryAddTask` is stricter — Go's `TryGo`: it succeeds only while
/// fewer than `limit` tasks are running or waiting.
///
/// | event                 | condition                                        | effect |
/// |-----------------------|--------------------------------------------------|--------|
/// | `addRequested(job)`   | group cancelled                                  | `.rejected` |
/// |                       | no idle worker, fewer than `limit` workers       | start a worker with `job` |
/// |                       | an idle worker, no wake-up pending               | hand `job` to it, wake-up pending |
/// |                       | room in the queue                                | enqueue `job` |
/// |                       | otherwise                                        | the adder parks with `job` |
/// | `workerWoke`          | —                                                | no wake-up pending; wake another idle worker if jobs are queued |
/// | `workerMayRun`        | group cancelled                                  | the task it was handed never starts; the worker exits |
/// | `jobFinished`         | a job is queued                                  | run it; admit the first parked adder's job into the queue |
/// |                       | body finished or group cancelled                 | the worker exits |
/// |                       | otherwise                                        | the worker parks (idle; it yields once before it suspends) |
/// | `taskFailed(error)`   | `CancellationError` in a cancelled group         | ignored: a consequence, not a failure |
/// |                       | `.collectAll`                                    | recorded, in order |
/// |                       | `.cancelAll`, first error                        | recorded, group cancelled |
/// | `bodyFinished`        | —                                                | closed: idle workers take queued jobs or exit |
/// | `bodyFailed(error)`   | —                                                | recorded, group cancelled |
/// | *cancel the group*    | —                                                | queued jobs dropped (never started), parked adders rejected, idle workers exit |
///
/// At most one idle worker is being woken at a time; a woken worker wakes the next one if
/// jobs are still queued. Trivial jobs are then drained by the workers already running, with
/// no wake-up per job, while slow jobs still spread over every worker.
struct ErrorGroupStateMachine {
    enum WorkerOutcome: Sendable {
        case job(GroupJob)
        case finish
    }

    enum AdderOutcome: Sendable {
        case accepted
        case rejected
    }

    enum AddAction {
        case startWorker(GroupJob)
        case accepted(Resumption<WorkerOutcome>?)
        case suspend(WaiterID)
        case rejected
    }

    enum NextAction {
        case run(GroupJob, admitted: Resumption<AdderOutcome>?)
        case park(WaiterID)
        case exit
    }

    enum FailureAction {
        case none
        /// The group must be cancelled: resume these, then make the task group cancel.
        case cancelGroup(Resumptions<WorkerOutcome>, Resumptions<AdderOutcome>)
    }

    let policy: ErrorGroupPolicy
    let limit: Int
    private(set) var queue = Deque<GroupJob>()
    private(set) var idle = WaiterQueue<Void, WorkerOutcome>()
    private(set) var adders = WaiterQueue<GroupJob, AdderOutcome>()
    /// Workers started and not exited.
    private(set) var workers = 0
    private var wakePending = false
    private(set) var isClosed = false
    private(set) var isCancelled = false
    private(set) var firstError: (any Error)?
    private(set) var errors: [any Error] = []
    private(set) var bodyError: (any Error)?

    init(policy: ErrorGroupPolicy, limit: Int) {
        self.policy = policy
        self.limit = limit
    }

    /// How many added tasks may wait for a worker before `addTask` suspends: enough that the
    /// adding task and the workers rarely wait for each other (a suspension costs as much as
    /// hundreds of queue operations), small enough to bound the work the body gets ahead by.
    var queueCapacity: Int { max(limit, Self.minimumPendingCapacity) }

    static let minimumPendingCapacity = 256

    /// Tasks running on a worker (not parked) or waiting in the queue.
    var runningOrWaiting: Int { workers - idle.count + queue.count }

    // MARK: Adding

    mutating func addRequested(_ job: GroupJob) -> AddAction {
        if isCancelled { return .rejected }
        if idle.isEmpty && workers < limit {
            workers += 1
            return .startWorker(job)
        }
        if !wakePending, let woken = idle.settleFirst(with: .job(job)) {
            wakePending = true
            return .accepted(woken.resumption)
        }
        if queue.count < queueCapacity {
            queue.append(job)
            return .accepted(nil)
        }
        return .suspend(adders.enqueue(job))
    }

    /// `tryAddTask`: `nil` (nothing changes) when `limit` tasks are already running or
    /// waiting — Go's `TryGo`.
    mutating func tryAddRequested(_ job: GroupJob) -> AddAction? {
        if !isCancelled && runningOrWaiting >= limit {
            return nil
        }
        return addRequested(job)
    }

    mutating func adderSuspended(_ id: WaiterID, _ continuation: UnsafeContinuation<AdderOutcome, Never>) -> Resumption<AdderOutcome>? {
        adders.suspend(id, continuation: continuation)
    }

    mutating func adderCancelled(_ id: WaiterID) -> Resumptions<AdderOutcome> {
        adders.cancel(id, with: .rejected)
    }

    // MARK: Workers

    /// A worker woken with a job has started running: let the next idle worker be woken.
    mutating func workerWoke() -> Resumptions<WorkerOutcome> {
        wakePending = false
        var woken = Resumptions<WorkerOutcome>()
        if let job = queue.first, let next = idle.settleFirst(with: .job(job)) {
            queue.removeFirst()
            wakePending = true
            woken.append(next.resumption)
        }
        return woken
    }

    /// A worker is about to run the task it was handed (when it was started, or woken from
    /// idle): `false` if the group was cancelled meanwhile — the task never starts, and the
    /// worker exits.
    mutating func workerMayRun() -> Bool {
        guard isCancelled else { return true }
        workers -= 1
        return false
    }

    mutating func jobFinished() -> NextAction {
        if let job = queue.popFirst() {
            var admitted: Resumption<AdderOutcome>?
            if let adder = adders.settleFirst(with: .accepted) {
                queue.append(adder.payload)
                admitted = adder.resumption
            }
            return .run(job, admitted: admitted)
        }
        if isClosed || isCancelled {
            workers -= 1
            return .exit
        }
        return .park(idle.enqueue(()))
    }

    mutating func workerSuspended(_ id: WaiterID, _ continuation: UnsafeContinuation<WorkerOutcome, Never>) -> Resumption<WorkerOutcome>? {
        idle.suspend(id, continuation: continuation)
    }

    /// An idle worker's task was cancelled: it leaves the line and exits.
    mutating func workerCancelled(_ id: WaiterID) -> Resumptions<WorkerOutcome> {
        var resumptions = Resumptions<WorkerOutcome>()
        if let left = idle.settle(id, with: .finish) {
            workers -= 1
            resumptions.append(left.resumption)
        }
        return resumptions
    }

    /// A worker ended by throwing (the group is cancelled).
    mutating func workerThrew() {
        workers -= 1
    }

    // MARK: Errors and the end

    /// A task threw `error` (the caller has already ignored the `CancellationError` of a
    /// cancelled task).
    mutating func taskFailed(_ error: any Error) -> FailureAction {
        if error is CancellationError && isCancelled {
            return .none
        }
        switch policy.base {
        case .collectAll:
            errors.append(error)
            return .none
        case .cancelAll:
            guard firstError == nil else { return .none }
            firstError = error
            let (workers, adders) = cancel()
            return .cancelGroup(workers, adders)
        }
    }

    mutating func bodyFinished() -> Resumptions<WorkerOutcome> {
        isClosed = true
        var resumptions = Resumptions<WorkerOutcome>()
        while !idle.isEmpty {
            if let job = queue.popFirst() {
                resumptions.append(idle.settleFirst(with: .job(job))?.resumption)
            } else {
                resumptions.append(idle.settleFirst(with: .finish)?.resumption)
                workers -= 1
            }
        }
        return resumptions
    }

    mutating func bodyFailed(_ error: any Error) -> (Resumptions<WorkerOutcome>, Resumptions<AdderOutcome>) {
        switch policy.base {
        case .cancelAll:
            if firstError == nil { firstError = error }
        case .collectAll:
            bodyError = error
        }
        return cancel()
    }

    /// Stops the group: queued jobs never start, parked adders are rejected, idle workers
    /// exit.
    private mutating func cancel() -> (Resumptions<WorkerOutcome>, Resumptions<AdderOutcome>) {
        var workerResumptions = Resumptions<WorkerOutcome>()
        var adderResumptions = Resumptions<AdderOutcome>()
        guard !isCancelled else { return (workerResumptions, adderResumptions) }
        isCancelled = true
        queue.removeAll()
        for adder in adders.settleAll(with: .rejected) {
            adderResumptions.append(adder.resumption)
        }
        for worker in idle.settleAll(with: .finish) {
            workerResumptions.append(worker.resumption)
            workers -= 1
        }
        return (workerResumptions, adderResumptions)
    }

    /// What the group throws once every task has finished, if anything.
    func failure() -> (any Error)? {
        switch policy.base {
        case .cancelAll:
            return firstError
        case .collectAll:
            if errors.isEmpty { return bodyError }
            return ErrorGroupFailure(errors: errors, bodyError: bodyError)
        }
    }
}
