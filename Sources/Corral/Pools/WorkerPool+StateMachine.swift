import DequeModule

/// The state of a ``WorkerPool``: its workers, its queue, the submitters waiting for room,
/// its lifecycle and its counters. All of it behind the pool's one lock.
///
/// Lifecycle: `accepting` → (`shutdown(.graceful)`) `draining`, or (`shutdown(.immediate)`,
/// or `run()`'s task cancelled) `stopping`. `run()` returns once the pool is shut down and its
/// last worker has exited.
///
/// Workers take jobs in *batches*: up to `maximumBatch`, and no more than their fair share
/// of the queue (`queued / workers`), so that with short jobs a worker takes the lock once per
/// batch rather than once per job, and with a short queue the jobs still spread over every
/// worker. A worker starts each job of its batch by winning the job's atomic `claim`, which a
/// cancellation or an immediate shutdown may win first (the job then never starts).
///
/// | event                    | condition                                   | effect |
/// |--------------------------|---------------------------------------------|--------|
/// | `submitRequested(job)`   | shut down                                   | `.refused` |
/// |                          | an idle worker, and no wake-up pending or no room in the queue | hand the job to it |
/// |                          | room in the queue, no submitter parked      | enqueue (elastic: start a worker if none is idle and fewer than `max` live) |
/// |                          | otherwise                                   | the submitter parks with its job (`trySubmit`: `.queueFull`) |
/// | `workerReady(w)`         | —                                           | report `w`'s last batch: publish each result that ran, put back any it did not start |
/// |                          | a job of `w`'s is being cancelled           | `w` retires (its task is cancelled); a replacement starts if below `min`, or if jobs are queued or submitters parked |
/// |                          | jobs are queued                             | take a batch; at or below the low watermark (half the capacity), admit parked submitters while there is room |
/// |                          | a submitter is parked (rendezvous pool)     | take its job; it is accepted |
/// |                          | shut down                                   | `w` exits, and so do the idle workers |
/// |                          | otherwise                                   | `w` parks (elastic, above `min`: with an idle timer) |
/// | `workerWoke(w)`          | —                                           | no wake-up pending; hand the first queued job to the next idle worker; then as *queue shrank* |
/// | `idleTimerFired(w)`      | `w` still idle, more than `min` live, nothing queued | `w` exits |
/// |                          | `w` still idle, jobs queued                 | `w` takes the first (it is needed); then as *queue shrank* |
/// | *queue shrank*           | accepting, at or below the low watermark    | admit parked submitters while there is room |
/// |                          | elastic, jobs queued, none idle, below `max` | start a worker |
/// | `resultRequested(j)`     | ended                                       | read the result |
/// |                          | it ran, its worker has not reported it      | publish its end now (see `resultRequested`) |
/// |                          | otherwise                                   | flag it waited-for; the waiter parks on it |
/// | `ranJobWaitedFor(j)`     | not yet published                           | publish its end now, without waiting for the batch's report |
/// | `cancelRequested(j)`     | queued                                      | end it (cancelled; its closure released), tombstone in the queue (compacted once tombstones outnumber live jobs, beyond a slack of 32); at or below the low watermark, admit parked submitters |
/// |                          | in a batch, not started                     | win its claim, end it (cancelled) |
/// |                          | running                                     | mark its worker; cancel the worker's task (outside the lock) |
/// | `shutdown(.graceful)`    | accepting                                   | draining; parked submitters refused; idle workers take queued jobs or exit |
/// | `shutdown(.immediate)`   | not stopping                                | stopping; queued and not-started batch jobs rejected; parked submitters refused; idle workers exit; the supervisor cancels the workers |
///
/// Accounting: a job accepted (`submitted`) ends exactly once, as completed, failed,
/// cancelled or rejected, when its end is published here.
///
/// Capacity: "room in the queue" means `waitingCount < queueCapacity`, where `waitingCount`
/// counts the queued jobs and those taken ahead in workers' batches (`heldAhead`), so that
/// batching never lets more jobs wait than the capacity.
struct WorkerPoolStateMachine {
    enum Lifecycle: Equatable {
        case accepting
        case draining
        case stopping
    }

    enum WorkerOutcome: Sendable {
        case batch([PoolJobBase])
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
        /// Not accepted yet: wait for room (an elastic pool may have asked for a worker).
        case suspend(WaiterID, Resumption<SupervisorEvent>?)
        /// Not accepted (an elastic pool may have asked for a worker, for the next ones).
        case queueFull(Resumption<SupervisorEvent>?)
        case refused
    }

    enum WorkerAction {
        case run([PoolJobBase])
        /// Run this job, already claimed for this worker (taken over from another's batch).
        case runClaimed(PoolJobBase)
        case park(WaiterID, idleTimeout: Duration?)
        case exit
    }

    /// The most jobs a worker takes at once.
    static let maximumBatch = 64

    /// Tombstones (queued jobs cancelled) the queue may hold beyond its live jobs before it is
    /// compacted.
    static let tombstoneSlack = 32

    let name: String
    let minimumWorkers: Int
    let maximumWorkers: Int
    let idleTimeout: Duration?
    let queueCapacity: Int

    private(set) var lifecycle = Lifecycle.accepting
    private(set) var isRunning = false
    private(set) var queue = Deque<PoolJobBase>()
    /// Jobs in `queue` that have not ended (tombstones excluded).
    private(set) var queuedCount = 0
    /// Jobs in workers' batches beyond the one each works on (the sum of `batch.count - 1`):
    /// jobs taken ahead, which still wait — or have run, until the batch is reported.
    private var heldAhead = 0
    private(set) var idle = WaiterQueue<PoolWorker, WorkerOutcome>()
    private(set) var submitters = WaiterQueue<PoolJobBase, SubmitOutcome>()
    /// Started workers that have not exited, for an immediate shutdown to reach their batches.
    private var workers: [ObjectIdentifier: PoolWorker] = [:]
    /// Workers started or about to be (asked of the supervisor) and not retired.
    private(set) var liveWorkers = 0
    /// Workers the supervisor must start, not yet asked.
    private var pendingStarts = 0
    /// Workers asked for (of the supervisor, or at `run()`) that have not started yet.
    private var startingWorkers = 0
    /// An idle worker was handed a job and has not started it yet. While one is pending, new
    /// jobs go to the queue rather than wake another idle worker: a running worker takes them
    /// as soon as it is done, where waking a worker per job would cost a thread wake-up per
    /// job. A woken worker wakes the next if jobs are still queued.
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

    /// The jobs that may be waiting for a worker, for the queue's capacity: those queued and
    /// those taken ahead in batches. An upper bound (a batch's jobs that have run count until
    /// it is reported), so that what waits never exceeds the capacity.
    var waitingCount: Int { queuedCount + heldAhead }

    private mutating func batchChanged(_ worker: PoolWorker, from oldCount: Int) {
        heldAhead += Swift.max(0, worker.batch.count - 1) - Swift.max(0, oldCount - 1)
    }

    var snapshot: WorkerPool.Stats {
        var stats = self.stats
        stats.workers = workers.count
        stats.idle = idle.count
        stats.queued = queuedCount
        // Jobs in workers' batches are published when the batch is reported, which may be
        // many jobs later: count those that have run, and those still waiting, now, so that
        // the counters (and diagnostics' progress, metrics) follow the jobs. The claim says
        // which: `recordedEnd` is written before a job is marked ran.
        for worker in workers.values where worker.holdsBatch {
            // Of the jobs not started, all wait but the one the (busy) worker is about to
            // start: as in `waitingCount`, a batch holds `count - 1` jobs ahead.
            var waiting = 0
            for job in worker.batch where !job.isEnded {
                switch job.claim.load(ordering: .acquiring) {
                case PoolJobBase.Claim.unclaimed:
                    waiting += 1
                case PoolJobBase.Claim.ran:
                    switch job.recordedEnd {
                    case .completed: stats.completed += 1
                    case .failed: stats.failed += 1
                    case .cancelled: stats.cancelled += 1
                    case .rejected: stats.rejected += 1
                    }
                default:
                    break  // running, or ended without running (already counted)
                }
            }
            stats.queued += Swift.min(waiting, Swift.max(0, worker.batch.count - 1))
        }
        return stats
    }

    /// Submitters waiting for room are let in once the queue has drained to half its capacity,
    /// not one slot at a time: a producer faster than the workers then suspends once per half
    /// a queue of jobs instead of once per job (the high/low watermark of NIO's backpressure).
    var lowWatermark: Int { queueCapacity / 2 }

    // MARK: Submitting

    mutating func submitRequested(_ job: PoolJobBase, mayWait: Bool) -> SubmitAction {
        guard lifecycle == .accepting else {
            stats.refused += 1
            return .refused
        }
        // While a woken worker has not started yet, new jobs queue for the running workers
        // rather than wake another idle one per job — unless there is no room in the queue:
        // an idle worker is then the room.
        if !wakePending || waitingCount >= queueCapacity, let worker = idle.settleFirst(with: .batch([job])) {
            stats.submitted += 1
            wakePending = true
            assign([job], to: worker.payload)
            return .accepted(worker.resumption, nil)
        }
        // FIFO: while submitters wait for room, newcomers wait behind them.
        if waitingCount < queueCapacity && submitters.isEmpty {
            stats.submitted += 1
            enqueue(job)
            return .accepted(nil, startWorkerIfUseful())
        }
        guard mayWait else {
            stats.refused += 1
            return .queueFull(startWorkerIfUseful(demand: queuedCount + submitters.count + 1))
        }
        let id = submitters.enqueue(job)
        return .suspend(id, startWorkerIfUseful(demand: queuedCount + submitters.count))
    }

    mutating func submitterSuspended(_ id: WaiterID, _ continuation: UnsafeContinuation<SubmitOutcome, Never>) -> Resumption<SubmitOutcome>? {
        submitters.suspend(id, continuation: continuation)
    }

    mutating func submitterCancelled(_ id: WaiterID) -> Resumptions<SubmitOutcome> {
        submitters.cancel(id, with: .cancelled)
    }

    private mutating func enqueue(_ job: PoolJobBase) {
        job.placement = .queued
        queue.append(job)
        queuedCount += 1
        stats.peakQueued = max(stats.peakQueued, waitingCount)
    }

    private mutating func assign(_ jobs: [PoolJobBase], to worker: PoolWorker) {
        for job in jobs { job.placement = .assigned(worker) }
        let oldCount = worker.batch.count
        worker.batch = jobs
        batchChanged(worker, from: oldCount)
        worker.holdsBatch = true
        stats.busy += 1
        stats.peakBusy = max(stats.peakBusy, stats.busy)
    }

    /// Moves waiting submitters' jobs into the queue while there is room, first come first.
    private mutating func admitSubmitters(into resumptions: inout Resumptions<SubmitOutcome>) {
        while waitingCount < queueCapacity, let submitter = submitters.settleFirst(with: .accepted) {
            stats.submitted += 1
            enqueue(submitter.payload)
            resumptions.append(submitter.resumption)
        }
    }

    /// Elastic pools: jobs wait (`demand`: queued, or held by waiting submitters) and no
    /// worker is idle — start one if below `max` and the workers already starting will not
    /// take them all.
    private mutating func startWorkerIfUseful(demand: Int? = nil) -> Resumption<SupervisorEvent>? {
        guard isRunning, idle.isEmpty, liveWorkers < maximumWorkers, (demand ?? queuedCount) > startingWorkers else { return nil }
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
        // Enough for the jobs already waiting (queued, or held by submitters waiting for room).
        let waiting = queuedCount + submitters.count
        let initial = lifecycle == .draining && queuedCount == 0
            ? 0
            : min(maximumWorkers, max(minimumWorkers, waiting))
        liveWorkers += initial
        startingWorkers += initial
        return initial
    }

    /// `run()` waits for something to do: the event to act on now, if any.
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
        if lifecycle != .accepting && liveWorkers == 0 && workers.isEmpty {
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

    mutating func workerStarted(_ worker: PoolWorker, task: UnsafeCurrentTask?) {
        worker.task = task
        workers[ObjectIdentifier(worker)] = worker
        startingWorkers -= 1
    }

    /// A worker reports its last batch and wants the next.
    mutating func workerReady(_ worker: PoolWorker, into resumptions: inout PoolResumptions) -> WorkerAction {
        if worker.holdsBatch {
            report(worker, into: &resumptions)
            // The report freed room (jobs taken ahead that have run): with nothing queued no
            // batch take below will let parked submitters in, so do it here.
            if queuedCount == 0, waitingCount <= lowWatermark, lifecycle == .accepting {
                admitSubmitters(into: &resumptions.submitters)
            }
            if worker.mustRetire {
                // A job's cancellation cancelled this worker's task for good.
                return retire(replace: true, into: &resumptions)
            }
        }
        if queuedCount > 0 {
            let share = queuedCount / max(1, liveWorkers)
            var batch: [PoolJobBase] = []
            batch.reserveCapacity(max(1, min(Self.maximumBatch, share)))
            while batch.count < max(1, min(Self.maximumBatch, share)), let job = queue.popFirst() {
                if job.isEnded { continue }  // cancelled while queued
                queuedCount -= 1
                batch.append(job)
            }
            if !batch.isEmpty {
                assign(batch, to: worker)  // first: the batch's jobs still wait, and count
                if waitingCount <= lowWatermark {
                    admitSubmitters(into: &resumptions.submitters)
                }
                return .run(batch)
            }
        }
        // Nothing queued: a submitter waiting for room (a rendezvous pool) hands its job over.
        if let submitter = submitters.settleFirst(with: .accepted) {
            stats.submitted += 1
            resumptions.submitters.append(submitter.resumption)
            assign([submitter.payload], to: worker)
            return .run([submitter.payload])
        }
        // Nothing queued: rather than sit idle while a job waits in another worker's batch
        // (behind a slow one), take it over.
        if lifecycle != .stopping, let stolen = stealUnstartedJob(for: worker) {
            assign([stolen], to: worker)
            return .runClaimed(stolen)
        }
        if lifecycle != .accepting {
            // Shut down and nothing left to run: this worker exits, and so do the idle ones.
            releaseIdleWorkers(into: &resumptions.workers)
            return retire(replace: false, into: &resumptions)
        }
        let timeout = liveWorkers > minimumWorkers ? idleTimeout : nil
        return .park(idle.enqueue(worker), idleTimeout: timeout)
    }

    /// Takes over the last job not yet started in another worker's batch, claiming it for
    /// `worker` (the other worker then skips it).
    private mutating func stealUnstartedJob(for worker: PoolWorker) -> PoolJobBase? {
        for other in workers.values where other !== worker {
            guard let index = other.batch.lastIndex(where: { $0.claim.load(ordering: .relaxed) == PoolJobBase.Claim.unclaimed }) else { continue }
            let job = other.batch[index]
            guard job.claimForRunning() else { continue }  // its worker started it just now
            let oldCount = other.batch.count
            other.batch.remove(at: index)
            batchChanged(other, from: oldCount)
            return job
        }
        return nil
    }

    /// Publishes the results of the jobs `worker` ran, and puts back those it did not start.
    /// The reported jobs are moved to `resumptions.released`, to be released (and most likely
    /// deallocated) after the lock.
    private mutating func report(_ worker: PoolWorker, into resumptions: inout PoolResumptions) {
        var putBack = 0
        for job in worker.batch {
            switch job.claim.load(ordering: .acquiring) {
            case PoolJobBase.Claim.ran, PoolJobBase.Claim.cancelling:
                // (It may have been published already, for someone waiting for it.)
                if !job.isEnded { finish(job, job.recordedEnd, into: &resumptions.waiters) }
            case PoolJobBase.Claim.unclaimed:
                putBack += 1
            default:
                break  // dropped: ended by a cancellation or an immediate shutdown
            }
        }
        stats.busy -= 1
        worker.holdsBatch = false
        if putBack > 0 {
            // The worker retires before starting these: back to the head of the queue, in order.
            for job in worker.batch.reversed() where job.claim.load(ordering: .relaxed) == PoolJobBase.Claim.unclaimed {
                job.placement = .queued
                queue.prepend(job)
                queuedCount += 1
            }
            if let woken = wakeIdleWorker() { resumptions.workers.append(woken) }
        }
        let oldCount = worker.batch.count
        swap(&worker.batch, &resumptions.released)
        batchChanged(worker, from: oldCount)
    }

    mutating func workerSuspended(_ id: WaiterID, _ continuation: UnsafeContinuation<WorkerOutcome, Never>) -> Resumption<WorkerOutcome>? {
        idle.suspend(id, continuation: continuation)
    }

    /// A worker handed a job while idle is running again: let the next idle worker be woken
    /// for the jobs still queued; then, as for any job leaving the queue (`queueShrank`), let
    /// waiting submitters in and start an elastic worker if jobs still wait with none idle.
    mutating func workerWoke(into resumptions: inout PoolResumptions) {
        wakePending = false
        if let woken = wakeIdleWorker() { resumptions.workers.append(woken) }
        queueShrank(into: &resumptions)
    }

    /// Jobs left the queue, or an idle worker was handed one, other than through a worker's
    /// report (`workerReady` does the same): at or below the low watermark, submitters waiting
    /// for room come in; an elastic pool starts a worker if jobs wait and none is idle. Without
    /// this, a submitter could wait for room in an empty queue, or a queued job for a worker
    /// that is never started, until some running job ends — for ever, if those jobs wait for
    /// it.
    private mutating func queueShrank(into resumptions: inout PoolResumptions) {
        if lifecycle == .accepting && waitingCount <= lowWatermark {
            admitSubmitters(into: &resumptions.submitters)
        }
        if let supervisor = startWorkerIfUseful() { resumptions.supervisor = supervisor }
    }

    private mutating func wakeIdleWorker() -> Resumption<WorkerOutcome>? {
        guard !wakePending, !idle.isEmpty else { return nil }
        while let job = queue.popFirst() {
            if job.isEnded { continue }
            queuedCount -= 1
            guard let worker = idle.settleFirst(with: .batch([job])) else {
                preconditionFailure("WorkerPool: idle worker vanished under the lock")
            }
            wakePending = true
            assign([job], to: worker.payload)
            return worker.resumption
        }
        return nil
    }

    /// An idle worker's timer fired: it exits if it is still idle and the pool is above `min`.
    mutating func idleTimerFired(_ id: WaiterID, into resumptions: inout PoolResumptions) {
        guard liveWorkers > minimumWorkers else { return }
        while let first = queue.first, first.isEnded { queue.removeFirst() }  // tombstones
        if let job = queue.first {
            // Jobs are queued (a wake-up is on its way to another idle worker): this worker
            // is needed, not surplus. It takes the first job, and parks again with a new
            // timer once idle (leaving it here would leave it idle with no timer at all).
            guard let woken = idle.settle(id, with: .batch([job])) else { return }
            queue.removeFirst()
            queuedCount -= 1
            assign([job], to: woken.payload)
            resumptions.workers.append(woken.resumption)
            queueShrank(into: &resumptions)
            return
        }
        guard let left = idle.settle(id, with: .exit) else { return }
        liveWorkers -= 1
        resumptions.workers.append(left.resumption)
    }

    /// An idle worker's task was cancelled (`run()`'s task was cancelled): it exits.
    mutating func idleWorkerCancelled(_ id: WaiterID) -> Resumptions<WorkerOutcome> {
        var resumptions = Resumptions<WorkerOutcome>()
        if let left = idle.settle(id, with: .exit) {
            liveWorkers -= 1
            resumptions.append(left.resumption)
        }
        return resumptions
    }

    /// A job cancellation is still cancelling this worker's task: it must not exit yet
    /// (that would free the task).
    func hasCancelsInFlight(_ worker: PoolWorker) -> Bool {
        worker.cancelsInFlight > 0
    }

    /// The worker's task is about to end.
    mutating func workerExited(_ worker: PoolWorker) -> Resumption<SupervisorEvent>? {
        workers.removeValue(forKey: ObjectIdentifier(worker))
        worker.task = nil
        return notifySupervisor()
    }

    private mutating func retire(replace: Bool, into resumptions: inout PoolResumptions) -> WorkerAction {
        liveWorkers -= 1
        let workWaits = queuedCount > 0 || !submitters.isEmpty  // (a rendezvous pool's work waits with its submitters)
        if replace && lifecycle != .stopping && (liveWorkers < minimumWorkers || workWaits) && liveWorkers < maximumWorkers {
            requestWorker()
            resumptions.supervisor = notifySupervisor()
        }
        return .exit
    }

    /// Once shut down with nothing queued, idle workers exit.
    private mutating func releaseIdleWorkers(into resumptions: inout Resumptions<WorkerOutcome>) {
        guard lifecycle != .accepting && queuedCount == 0 else { return }
        for worker in idle.settleAll(with: .exit) {
            liveWorkers -= 1
            resumptions.append(worker.resumption)
        }
    }

    // MARK: Jobs

    private mutating func finish(_ job: PoolJobBase, _ end: JobEnd, into waiters: inout Resumptions<Bool>) {
        job.placement = .ended(end)
        switch end {
        case .completed: stats.completed += 1
        case .failed: stats.failed += 1
        case .cancelled: stats.cancelled += 1
        case .rejected: stats.rejected += 1
        }
        guard let list = job.waiterList else { return }
        for waiter in list.queue.settleAll(with: true) {
            waiters.append(waiter.resumption)
        }
    }

    /// Ends a job that will never run.
    private mutating func drop(_ job: PoolJobBase, _ end: JobEnd, error: any Error, into waiters: inout Resumptions<Bool>) {
        job.endWithoutRunning(error)
        finish(job, end, into: &waiters)
    }

    enum ResultAction {
        /// The job has ended: read its result, after resuming these other waiters.
        case ended(Resumptions<Bool>)
        /// Suspend with this id until the job ends.
        case wait(WaiterID)
    }

    /// `value` asks for the result.
    ///
    /// A worker publishes its jobs' ends when it reports its batch, which may be many jobs
    /// later; a job that someone waits for must not wait for its batch-mates (nor deadlock
    /// when a later job of the same batch waits for it). So the waiter raises the job's
    /// `waited` flag, then looks at its claim: a job that already ran is published here, and
    /// a worker that finishes a job looks at the flag after marking it ran and publishes it
    /// then (`ranJobWaitedFor`). The flag and the claim are sequentially consistent, so at
    /// least one of the two sees the other; publishing twice is harmless.
    mutating func resultRequested(_ job: PoolJobBase) -> ResultAction {
        var waiters = Resumptions<Bool>()
        if job.isEnded { return .ended(waiters) }
        job.waited.store(true, ordering: .sequentiallyConsistent)
        if job.claim.load(ordering: .sequentiallyConsistent) == PoolJobBase.Claim.ran {
            finish(job, job.recordedEnd, into: &waiters)
            return .ended(waiters)
        }
        return .wait(job.waitersForEnqueue().queue.enqueue(()))
    }

    /// A worker ran `job`, which someone waits for: publish its end now rather than with the
    /// worker's batch. Returns the waiters to resume.
    mutating func ranJobWaitedFor(_ job: PoolJobBase) -> Resumptions<Bool> {
        var waiters = Resumptions<Bool>()
        if !job.isEnded { finish(job, job.recordedEnd, into: &waiters) }
        return waiters
    }

    mutating func resultWaiterSuspended(_ job: PoolJobBase, _ id: WaiterID, _ continuation: UnsafeContinuation<Bool, Never>) -> Resumption<Bool>? {
        job.waitersForEnqueue().queue.suspend(id, continuation: continuation)
    }

    mutating func resultWaiterCancelled(_ job: PoolJobBase, _ id: WaiterID) -> Resumptions<Bool> {
        job.waitersForEnqueue().queue.cancel(id, with: false)
    }

    enum CancelAction {
        case none
        /// Ended before it started: resume these waiters, and these submitters let in.
        case ended(Resumptions<Bool>, Resumptions<SubmitOutcome>)
        /// Running: cancel this task, then report with `jobCancelDelivered`.
        case cancelTask(UnsafeCurrentTask, PoolWorker)
    }

    mutating func cancelRequested(_ job: PoolJobBase) -> CancelAction {
        var waiters = Resumptions<Bool>()
        switch job.placement {
        case .queued:
            // Ends now (its closure released); stays in the queue as a tombstone until popped,
            // or until tombstones outnumber the jobs queued: callers that submit and cancel
            // while the workers are busy must not grow the queue without bound.
            _ = job.claimForDropping()
            queuedCount -= 1
            drop(job, .cancelled, error: CancellationError(), into: &waiters)
            if queue.count - queuedCount > Swift.max(Self.tombstoneSlack, queuedCount) {
                queue.removeAll { $0.isEnded }
            }
            // Its place in the queue is free: submitters waiting for room may come in.
            var submitters = Resumptions<SubmitOutcome>()
            if waitingCount <= lowWatermark { admitSubmitters(into: &submitters) }
            return .ended(waiters, submitters)
        case .assigned(let worker):
            if job.claimForDropping() {
                drop(job, .cancelled, error: CancellationError(), into: &waiters)
                return .ended(waiters, Resumptions())
            }
            guard job.claimForCancellingItsTask(), let task = worker.task else { return .none }
            worker.mustRetire = true
            worker.cancelsInFlight += 1
            return .cancelTask(task, worker)
        case .ended:
            return .none
        }
    }

    mutating func jobCancelDelivered(_ worker: PoolWorker) {
        worker.cancelsInFlight -= 1
    }

    // MARK: Shutdown

    mutating func shutdownRequested(immediate: Bool) -> PoolResumptions {
        var resumptions = PoolResumptions()
        switch (lifecycle, immediate) {
        case (.stopping, _), (.draining, false):
            return resumptions
        case (.accepting, false):
            lifecycle = .draining
        case (_, true):
            lifecycle = .stopping
            let rejection = PoolError.shutdown(pool: name)
            while let job = queue.popFirst() {
                if job.isEnded {  // cancelled while queued
                    resumptions.released.append(job)
                    continue
                }
                _ = job.claimForDropping()
                queuedCount -= 1
                drop(job, .rejected, error: rejection, into: &resumptions.waiters)
                resumptions.dropped.append(job)
            }
            for worker in workers.values {
                for job in worker.batch where !job.isEnded && job.claimForDropping() {
                    drop(job, .rejected, error: rejection, into: &resumptions.waiters)
                    resumptions.dropped.append(job)
                }
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
            guard let worker = idle.settleFirst(with: .batch([job])) else { break }
            assign([job], to: worker.payload)
            resumptions.workers.append(worker.resumption)
        }
        releaseIdleWorkers(into: &resumptions.workers)
        resumptions.supervisor = notifySupervisor()
        return resumptions
    }
}

/// What must be done once the pool's lock is released, after a worker's report
/// (`workerReady`), a wake-up, an idle timer or a shutdown.
struct PoolResumptions {
    var waiters = Resumptions<Bool>()
    var submitters = Resumptions<WorkerPoolStateMachine.SubmitOutcome>()
    var workers = Resumptions<WorkerPoolStateMachine.WorkerOutcome>()
    var supervisor: Resumption<WorkerPoolStateMachine.SupervisorEvent>?
    /// Jobs let go of under the lock (a reported batch, tombstones taken out of the queue):
    /// released after it, since releasing may deallocate them.
    var released: [PoolJobBase] = []
    /// Jobs dropped without running (by a shutdown): their closures are released after the
    /// lock, since what they captured may run user code when it goes.
    var dropped: [PoolJobBase] = []

    /// Resumes everyone, then releases the dropped jobs' closures. Call once the lock is
    /// released.
    func resumeAll() {
        waiters.resumeAll()
        submitters.resumeAll()
        workers.resumeAll()
        supervisor?.resume()
        for job in dropped { job.releaseOperation() }
    }
}
