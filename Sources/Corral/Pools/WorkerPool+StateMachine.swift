import DequeModule

/// The state of a ``WorkerPool``: its workers, its queue, the submitters waiting for room,
/// its lifecycle and its counters. All of it behind the pool's one lock.
///
/// Lifecycle: `accepting` → (`shutdown(.graceful)`) `draining` → `finished`, or
/// (`shutdown(.immediate)`, or `run()`'s task cancelled) `stopping` → `finished`. `run()`
/// returns once the pool is shut down and its last worker has exited.
///
/// | event                    | condition                                   | effect |
/// |--------------------------|---------------------------------------------|--------|
/// | `submitRequested(job)`   | shut down                                   | `.refused` |
/// |                          | an idle worker                              | hand the job to it |
/// |                          | room in the queue, no submitter parked      | enqueue (elastic: start a worker if none is idle and fewer than `max` live) |
/// |                          | otherwise                                   | the submitter parks with its job |
/// | `workerReady(w, ended)`  | —                                           | publish the ended job's result (resume its waiters) |
/// |                          | `w`'s job was cancelled through its handle  | `w` exits (its task is cancelled); a replacement is started if needed |
/// |                          | a job is queued                             | run it; at or below the low watermark (half the capacity), admit parked submitters while there is room |
/// |                          | a submitter is parked (rendezvous pool)     | run its job; it is accepted |
/// |                          | shut down                                   | `w` exits |
/// |                          | otherwise                                   | `w` parks (elastic, above `min`: with an idle timer) |
/// | `idleTimerFired(w)`      | `w` still idle and more than `min` live      | `w` exits |
/// | `cancelJob(j)`           | queued                                      | tombstone it, end it with `CancellationError` |
/// |                          | running on `w`                              | mark `w`, cancel `w`'s task (outside the lock) |
/// | `shutdown(.graceful)`    | accepting                                   | draining; parked submitters refused; idle workers exit if the queue is empty |
/// | `shutdown(.immediate)`   | not stopping                                | stopping; queued jobs rejected; parked submitters refused; idle workers exit; the supervisor cancels the workers |
///
/// Accounting: a job accepted (`submitted`) ends exactly once, as completed, failed,
/// cancelled or rejected, when its end is published here.
struct WorkerPoolStateMachine {
    enum Lifecycle: Equatable {
        case accepting
        case draining
        case stopping
    }

    enum WorkerOutcome: Sendable {
        case job(PoolJobBase)
        case exit
    }

    enum SubmitOutcome: Sendable {
        case accepted
        case refused
        case cancelled
    }

    /// What the supervisor (the body of `run()`) must do.
    enum SupervisorEvent: Sendable {
        case startWorkers(Int)
        case cancelWorkers
        case finished
    }

    enum SubmitAction {
        /// Accepted. Resume the idle worker given the job, if any; tell the supervisor to
        /// start workers, if any.
        case accepted(Resumption<WorkerOutcome>?, Resumption<SupervisorEvent>?)
        case suspend(WaiterID)
        case queueFull
        case refused
    }

    enum WorkerAction {
        case run(PoolJobBase)
        case park(WaiterID, idleTimeout: Duration?)
        case exit
    }

    struct WorkerSlot {
        /// The worker's task, to cancel the job it runs; valid while the worker has not exited.
        var task: UnsafeCurrentTask?
        var job: PoolJobBase?
        var cancelRequested = false
        var cancelsInFlight = 0
    }

    let name: String
    let minimumWorkers: Int
    let maximumWorkers: Int
    let idleTimeout: Duration?
    let queueCapacity: Int

    private(set) var lifecycle = Lifecycle.accepting
    private(set) var isRunning = false
    private(set) var queue = Deque<PoolJobBase>()
    /// Jobs in `queue` that are not tombstones.
    private(set) var queuedCount = 0
    private(set) var idle = WaiterQueue<Int, WorkerOutcome>()
    private(set) var submitters = WaiterQueue<PoolJobBase, SubmitOutcome>()
    private(set) var slots: [Int: WorkerSlot] = [:]
    /// Workers started or about to be (asked of the supervisor) and not exited.
    private(set) var liveWorkers = 0
    private var nextWorkerID = 0
    /// Workers the supervisor must start, not yet asked.
    private var pendingStarts = 0
    /// Workers asked for (of the supervisor, or at `run()`) that have not started yet.
    private var startingWorkers = 0
    /// An idle worker was handed a job and has not started it yet. While one is pending, new
    /// jobs go to the queue rather than wake another idle worker: a worker that is running
    /// takes them as soon as it is done, and waking a worker per job would cost a thread
    /// wake-up per job. A woken worker wakes the next if jobs are still queued.
    private var wakePending = false
    private var supervisor: UnsafeContinuation<SupervisorEvent, Never>?
    private var pendingSupervisorEvent: SupervisorEvent?
    private(set) var stats = WorkerPool.Stats()
    /// Deadlines that escalate a graceful shutdown; disarmed when `run()` returns.
    var escalations: [DeadlineScope] = []

    init(name: String, workers: WorkerPool.Configuration.Workers, queueCapacity: Int) {
        self.name = name
        self.minimumWorkers = workers.minimum
        self.maximumWorkers = workers.maximum
        self.idleTimeout = workers.idleTimeout
        self.queueCapacity = queueCapacity
    }

    var snapshot: WorkerPool.Stats {
        var stats = self.stats
        stats.workers = slots.count
        stats.idle = idle.count
        stats.queued = queuedCount
        return stats
    }

    // MARK: Submitting

    mutating func submitRequested(_ job: PoolJobBase, mayWait: Bool) -> SubmitAction {
        guard lifecycle == .accepting else {
            stats.refused += 1
            return .refused
        }
        if !wakePending || queueCapacity == 0, let worker = idle.settleFirst(with: .job(job)) {
            stats.submitted += 1
            wakePending = true
            start(job, on: worker.payload)
            return .accepted(worker.resumption, nil)
        }
        // FIFO: while submitters wait for room, newcomers wait behind them.
        if queuedCount < queueCapacity && submitters.isEmpty {
            stats.submitted += 1
            enqueue(job)
            return .accepted(nil, startWorkerIfUseful())
        }
        guard mayWait else {
            stats.refused += 1
            return .queueFull
        }
        return .suspend(submitters.enqueue(job))
    }

    mutating func submitterSuspended(_ id: WaiterID, _ continuation: UnsafeContinuation<SubmitOutcome, Never>) -> Resumption<SubmitOutcome>? {
        submitters.suspend(id, continuation: continuation)
    }

    mutating func submitterCancelled(_ id: WaiterID) -> Resumptions<SubmitOutcome> {
        submitters.cancel(id, with: .cancelled)
    }

    /// Submitters waiting for room are let in once the queue has drained to half its capacity,
    /// not one slot at a time: a producer faster than the workers then suspends once per half
    /// a queue of jobs instead of once per job (the high/low watermark of NIO's backpressure).
    var lowWatermark: Int { queueCapacity / 2 }

    /// Moves waiting submitters' jobs into the queue while there is room, first come first.
    private mutating func admitSubmitters(into resumptions: inout Resumptions<SubmitOutcome>) {
        while queuedCount < queueCapacity, let submitter = submitters.settleFirst(with: .accepted) {
            stats.submitted += 1
            enqueue(submitter.payload)
            resumptions.append(submitter.resumption)
        }
    }

    private mutating func enqueue(_ job: PoolJobBase) {
        job.phase = .queued
        queue.append(job)
        queuedCount += 1
        stats.peakQueued = max(stats.peakQueued, queuedCount)
    }

    private mutating func start(_ job: PoolJobBase, on workerID: Int) {
        job.phase = .running(workerID: workerID)
        slots[workerID, default: WorkerSlot()].job = job
        stats.busy += 1
        stats.peakBusy = max(stats.peakBusy, stats.busy)
    }

    /// Elastic pools: a job was queued and no worker is idle — start one if below `max` and
    /// the workers already starting will not take every queued job.
    private mutating func startWorkerIfUseful() -> Resumption<SupervisorEvent>? {
        guard isRunning, idle.isEmpty, liveWorkers < maximumWorkers, queuedCount > startingWorkers else { return nil }
        requestWorker()
        return notifySupervisor()
    }

    private mutating func requestWorker() {
        liveWorkers += 1
        startingWorkers += 1
        pendingStarts += 1
    }

    // MARK: The supervisor

    /// `run()` starts: how many workers to start first.
    mutating func runStarted() -> Int {
        precondition(!isRunning, "WorkerPool.run(): the pool is already running (run() may be called once)")
        isRunning = true
        if lifecycle == .stopping { return 0 }
        let initial = lifecycle == .draining && queuedCount == 0
            ? 0
            : min(maximumWorkers, max(minimumWorkers, queuedCount))
        liveWorkers += initial
        startingWorkers += initial
        return initial
    }

    /// `run()` has started its first workers and waits: the event to act on now, if any.
    mutating func supervisorWaits(_ continuation: UnsafeContinuation<SupervisorEvent, Never>) -> Resumption<SupervisorEvent>? {
        if let event = takeSupervisorEvent() {
            return Resumption(continuation, event)
        }
        supervisor = continuation
        return nil
    }

    private mutating func takeSupervisorEvent() -> SupervisorEvent? {
        if let event = pendingSupervisorEvent {
            pendingSupervisorEvent = nil
            return event
        }
        if pendingStarts > 0 {
            defer { pendingStarts = 0 }
            return .startWorkers(pendingStarts)
        }
        if lifecycle != .accepting && liveWorkers == 0 {
            return .finished
        }
        return nil
    }

    private mutating func notifySupervisor() -> Resumption<SupervisorEvent>? {
        guard let supervisor, let event = takeSupervisorEvent() else { return nil }
        self.supervisor = nil
        return Resumption(supervisor, event)
    }

    // MARK: Workers

    mutating func workerStarted(_ workerID: Int, task: UnsafeCurrentTask?) {
        slots[workerID, default: WorkerSlot()].task = task
        startingWorkers -= 1
    }

    mutating func makeWorkerID() -> Int {
        nextWorkerID += 1
        return nextWorkerID
    }

    /// A worker finished `ended` (if any) and wants its next job.
    mutating func workerReady(
        _ workerID: Int,
        ended: (job: PoolJobBase, end: JobEnd)?,
        into resumptions: inout ReadyResumptions
    ) -> WorkerAction {
        if let (job, end) = ended {
            slots[workerID]?.job = nil
            stats.busy -= 1
            finish(job, end, into: &resumptions.waiters)
            if slots[workerID]?.cancelRequested == true {
                // Its task is cancelled for good: this worker retires, a fresh one replaces it.
                return retire(workerID, replace: true, into: &resumptions)
            }
        }
        while let job = queue.popFirst() {
            if job.isEnded { continue }  // cancelled while queued
            queuedCount -= 1
            start(job, on: workerID)
            if queuedCount <= lowWatermark {
                admitSubmitters(into: &resumptions.submitters)
            }
            return .run(job)
        }
        // Nothing queued: a submitter waiting for room (a rendezvous pool) hands its job over.
        if let submitter = submitters.settleFirst(with: .accepted) {
            stats.submitted += 1
            start(submitter.payload, on: workerID)
            resumptions.submitters.append(submitter.resumption)
            return .run(submitter.payload)
        }
        if lifecycle != .accepting {
            // Shut down and nothing left to run: this worker exits, and so do the idle ones.
            releaseIdleWorkers(into: &resumptions.workers)
            return retire(workerID, replace: false, into: &resumptions)
        }
        let timeout = liveWorkers > minimumWorkers ? idleTimeout : nil
        return .park(idle.enqueue(workerID), idleTimeout: timeout)
    }

    mutating func workerSuspended(_ id: WaiterID, _ continuation: UnsafeContinuation<WorkerOutcome, Never>) -> Resumption<WorkerOutcome>? {
        idle.suspend(id, continuation: continuation)
    }

    /// A worker handed a job while idle is running again: let the next idle worker be woken
    /// for the jobs still queued.
    mutating func workerWoke() -> Resumption<WorkerOutcome>? {
        wakePending = false
        guard queuedCount > 0, !idle.isEmpty else { return nil }
        while let job = queue.popFirst() {
            if job.isEnded { continue }
            guard let worker = idle.settleFirst(with: .job(job)) else {
                queue.prepend(job)
                return nil
            }
            queuedCount -= 1
            wakePending = true
            start(job, on: worker.payload)
            return worker.resumption
        }
        return nil
    }

    /// An idle worker's timer fired: it exits if it is still idle and the pool is above `min`.
    mutating func idleTimerFired(_ id: WaiterID) -> Resumption<WorkerOutcome>? {
        guard liveWorkers > minimumWorkers, let left = idle.settle(id, with: .exit) else { return nil }
        liveWorkers -= 1
        slots.removeValue(forKey: left.payload)
        return left.resumption
    }

    /// An idle worker's task was cancelled (run()'s task was cancelled): it exits.
    mutating func idleWorkerCancelled(_ id: WaiterID) -> Resumptions<WorkerOutcome> {
        var resumptions = Resumptions<WorkerOutcome>()
        if let left = idle.settle(id, with: .exit) {
            liveWorkers -= 1
            slots.removeValue(forKey: left.payload)
            resumptions.append(left.resumption)
        }
        return resumptions
    }

    /// Whether a job cancellation is still cancelling this worker's task (it must not exit,
    /// which would free the task, until that is done).
    func hasCancelsInFlight(_ workerID: Int) -> Bool {
        (slots[workerID]?.cancelsInFlight ?? 0) > 0
    }

    /// The worker has exited (its slot is removed once no cancellation is in flight).
    mutating func workerExited(_ workerID: Int) -> Resumption<SupervisorEvent>? {
        slots.removeValue(forKey: workerID)
        return notifySupervisor()
    }

    private mutating func retire(_ workerID: Int, replace: Bool, into resumptions: inout ReadyResumptions) -> WorkerAction {
        liveWorkers -= 1
        if replace && lifecycle != .stopping && (liveWorkers < minimumWorkers || queuedCount > 0) && liveWorkers < maximumWorkers {
            requestWorker()
        }
        return .exit
    }

    // MARK: Jobs

    private mutating func finish(_ job: PoolJobBase, _ end: JobEnd, into waiters: inout Resumptions<Bool>) {
        job.phase = .ended(end)
        switch end {
        case .completed: stats.completed += 1
        case .failed: stats.failed += 1
        case .cancelled: stats.cancelled += 1
        case .rejected: stats.rejected += 1
        }
        for waiter in job.waiters.settleAll(with: true) {
            waiters.append(waiter.resumption)
        }
    }

    /// `value` asks for the result: `nil` when the job has ended (read it), or the id to
    /// suspend with.
    mutating func resultRequested(_ job: PoolJobBase) -> WaiterID? {
        job.isEnded ? nil : job.waiters.enqueue(())
    }

    mutating func resultWaiterSuspended(_ job: PoolJobBase, _ id: WaiterID, _ continuation: UnsafeContinuation<Bool, Never>) -> Resumption<Bool>? {
        job.waiters.suspend(id, continuation: continuation)
    }

    mutating func resultWaiterCancelled(_ job: PoolJobBase, _ id: WaiterID) -> Resumptions<Bool> {
        job.waiters.cancel(id, with: false)
    }

    enum CancelAction {
        case none
        /// Ended in the queue: resume these waiters.
        case ended(Resumptions<Bool>)
        /// Running: cancel this task, then report with `jobCancelDelivered`.
        case cancelTask(UnsafeCurrentTask, workerID: Int)
    }

    mutating func cancelRequested(_ job: PoolJobBase) -> CancelAction {
        switch job.phase {
        case .queued:
            // Ends now; stays in the queue as a tombstone until a worker pops it.
            queuedCount -= 1
            job.endWithoutRunning(CancellationError())
            var waiters = Resumptions<Bool>()
            finish(job, .cancelled, into: &waiters)
            return .ended(waiters)
        case .running(let workerID):
            guard var slot = slots[workerID], let task = slot.task, !slot.cancelRequested else { return .none }
            slot.cancelRequested = true
            slot.cancelsInFlight += 1
            slots[workerID] = slot
            return .cancelTask(task, workerID: workerID)
        case .ended:
            return .none
        }
    }

    mutating func jobCancelDelivered(workerID: Int) {
        slots[workerID]?.cancelsInFlight -= 1
    }

    // MARK: Shutdown

    struct ShutdownResumptions {
        var workers = Resumptions<WorkerOutcome>()
        var submitters = Resumptions<SubmitOutcome>()
        var waiters = Resumptions<Bool>()
        var supervisor: Resumption<SupervisorEvent>?
    }

    mutating func shutdownRequested(immediate: Bool) -> ShutdownResumptions {
        var resumptions = ShutdownResumptions()
        switch (lifecycle, immediate) {
        case (.stopping, _), (.draining, false):
            return resumptions
        case (.accepting, false):
            lifecycle = .draining
        case (_, true):
            lifecycle = .stopping
            while let job = queue.popFirst() {
                if job.isEnded { continue }  // cancelled while queued
                queuedCount -= 1
                job.endWithoutRunning(PoolError.shutdown(pool: name))
                finish(job, .rejected, into: &resumptions.waiters)
            }
            // Workers asked for but not started are not needed any more.
            liveWorkers -= pendingStarts
            startingWorkers -= pendingStarts
            pendingStarts = 0
            pendingSupervisorEvent = isRunning ? .cancelWorkers : nil
        }
        for submitter in submitters.settleAll(with: .refused) {
            stats.refused += 1
            resumptions.submitters.append(submitter.resumption)
        }
        // Idle workers drain what is queued (a graceful shutdown), then exit.
        while !idle.isEmpty, let job = queue.popFirst() {
            if job.isEnded { continue }
            queuedCount -= 1
            let worker = idle.settleFirst(with: .job(job))!
            start(job, on: worker.payload)
            resumptions.workers.append(worker.resumption)
        }
        releaseIdleWorkers(into: &resumptions.workers)
        resumptions.supervisor = notifySupervisor()
        return resumptions
    }

    /// Once shut down with nothing queued, idle workers exit.
    private mutating func releaseIdleWorkers(into resumptions: inout Resumptions<WorkerOutcome>) {
        guard lifecycle != .accepting && queuedCount == 0 else { return }
        for worker in idle.settleAll(with: .exit) {
            liveWorkers -= 1
            slots.removeValue(forKey: worker.payload)
            resumptions.append(worker.resumption)
        }
    }
}

/// What a worker must resume after `workerReady`, once the lock is released.
struct ReadyResumptions {
    var waiters = Resumptions<Bool>()
    var submitters = Resumptions<WorkerPoolStateMachine.SubmitOutcome>()
    var workers = Resumptions<WorkerPoolStateMachine.WorkerOutcome>()
}
