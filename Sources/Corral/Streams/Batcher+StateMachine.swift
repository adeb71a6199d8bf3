import DequeModule
import Synchronization

/// The state of a ``Batcher``: the open batch that submitters add to, the sealed batches
/// waiting for a handler slot, and the two tasks of `run()` that act on them (the supervisor,
/// which starts handler calls, and the timer, which seals a batch `maxDelay` after its first
/// item).
///
/// A batch is *open* while it takes items (and its items can be withdrawn); *due* once
/// `maxDelay` has passed since its first item (still open, so that items arriving while every
/// handler slot is busy join it); *sealed* once it is full, due with a handler slot free, or
/// flushed by shutdown; and *dispatched* when a handler call starts for it. Its callers wait on its `BatchOutcome`, which has its own lock.
///
/// Invariants: at most one open batch, holding `1...maxSize` live items (an open batch
/// whose last item is withdrawn is discarded); `running <= maxConcurrentBatches`; the
/// supervisor is parked only while it has nothing to do (no sealed batch with a free slot,
/// and not finishing); the timer is parked only while no batch is open; after shutdown no
/// batch opens.
///
/// Transitions:
///
/// | event                  | condition                               | effect |
/// |------------------------|-----------------------------------------|--------|
/// | `enqueue(item)`        | shut down                               | refused (`BatcherError.shutdown`) |
/// |                        | no open batch                           | open one due at `now + maxDelay`; wake the parked timer |
/// |                        | —                                       | append; at `maxSize` live items seal it (by size) and wake the supervisor |
/// | `withdraw(batch, slot)`| the batch is still open                 | mark the slot withdrawn; discard the batch if no item is left |
/// |                        | sealed                                  | nothing: the item is handled, its result discarded |
/// | `timerNext`            | finished                                | `.exit` |
/// |                        | a batch is open and not yet due         | `.sleep(until: its deadline, generation)` |
/// |                        | otherwise                               | park |
/// | `timerFired(g)`        | the open batch has generation `g`       | mark it *due*; wake the supervisor (a due batch goes on taking items until a handler slot is free) |
/// | `supervisorNext`       | a free handler slot, nothing sealed, the open batch due | seal it (by delay), then as below |
/// |                        | a sealed batch and a free handler slot  | `.dispatch(batch)`, `running += 1` |
/// |                        | shut down, nothing open, sealed or running | `.finished`: stop the timer |
/// |                        | otherwise                               | park |
/// | `batchFinished`        | —                                       | `running -= 1`; wake the supervisor |
/// | `shutdown`             | not yet shut down                       | refuse new items; seal the open batch (by shutdown); wake the supervisor and the timer |
@usableFromInline
struct BatcherState<Item: Sendable, Output: Sendable, C: Clock> {
    /// The batch taking items; `outcome == nil` while none is open. (Stored in place, not
    /// as an optional, so that appending to it never copies it.)
    @usableFromInline
    struct OpenBatch {
        @usableFromInline
        var outcome: BatchOutcome<Output>?
        @usableFromInline
        var items: [Item] = []
        /// Empty until the first withdrawal; then one flag per slot.
        @usableFromInline
        var withdrawn: [Bool] = []
        @usableFromInline
        var live = 0
        @usableFromInline
        var deadline: C.Instant?
        @usableFromInline
        var generation = 0
        /// Its delay has passed, but no handler slot was free: it goes on taking items until
        /// it is full or a slot frees, whichever comes first.
        @usableFromInline
        var isDue = false

        @inlinable
        init() {}

        @inlinable
        var isOpen: Bool { outcome != nil }
    }

    @usableFromInline
    enum FlushReason {
        case size, delay, shutdown
    }

    @usableFromInline
    struct SealedBatch: Sendable {
        @usableFromInline
        let items: [Item]
        @usableFromInline
        let outcome: BatchOutcome<Output>
        /// Slot → index in `items`, when some slots were withdrawn (`-1` for those).
        @usableFromInline
        let slotToOutput: [Int]?
    }

    @usableFromInline
    enum SupervisorAction: Sendable {
        case dispatch(SealedBatch)
        case finished
    }

    @usableFromInline
    enum TimerAction: Sendable {
        case sleep(until: C.Instant, generation: Int)
        case exit
    }

    @usableFromInline
    let maxSize: Int
    @usableFromInline
    let maxDelay: C.Duration
    @usableFromInline
    let maxConcurrentBatches: Int
    @usableFromInline
    let clock: C

    @usableFromInline
    var open = OpenBatch()
    @usableFromInline
    var sealed: Deque<SealedBatch> = []
    @usableFromInline
    var running = 0
    @usableFromInline
    var generation = 0
    @usableFromInline
    var runStarted = false
    @usableFromInline
    var isShutDown = false
    @usableFromInline
    var isFinished = false
    @usableFromInline
    var supervisor: UnsafeContinuation<SupervisorAction, Never>?
    @usableFromInline
    var timer: UnsafeContinuation<TimerAction, Never>?
    @usableFromInline
    var stats = BatcherStats()

    @usableFromInline
    init(maxSize: Int, maxDelay: C.Duration, maxConcurrentBatches: Int, clock: C) {
        self.maxSize = maxSize
        self.maxDelay = maxDelay
        self.maxConcurrentBatches = maxConcurrentBatches
        self.clock = clock
    }

    // MARK: Submitters

    @usableFromInline
    enum EnqueueResult {
        case accepted(BatchOutcome<Output>, slot: Int, wake: Wake)
        case refused
    }

    /// Continuations to resume once the lock is released.
    @usableFromInline
    struct Wake {
        @usableFromInline
        var supervisor: (UnsafeContinuation<SupervisorAction, Never>, SupervisorAction)?
        @usableFromInline
        var timer: (UnsafeContinuation<TimerAction, Never>, TimerAction)?

        @inlinable
        init() {}

        @inlinable
        func resume() {
            if let (continuation, action) = supervisor { continuation.resume(returning: action) }
            if let (continuation, action) = timer { continuation.resume(returning: action) }
        }
    }

    @inlinable
    mutating func enqueue(_ item: Item) -> EnqueueResult {
        guard !isShutDown else { return .refused }
        var wake = Wake()
        if !open.isOpen {
            generation += 1
            let deadline = clock.now.advanced(by: maxDelay)
            open.outcome = BatchOutcome()
            open.items.reserveCapacity(maxSize)
            open.deadline = deadline
            open.generation = generation
            if let timer = self.timer {
                self.timer = nil
                wake.timer = (timer, .sleep(until: deadline, generation: generation))
            }
        }
        let slot = open.items.count
        let outcome = open.outcome.unsafelyUnwrapped
        open.items.append(item)
        if !open.withdrawn.isEmpty { open.withdrawn.append(false) }
        open.live += 1
        stats.submitted += 1
        if open.live >= maxSize {
            seal(.size)
            wake.supervisor = supervisorWake()
        }
        return .accepted(outcome, slot: slot, wake: wake)
    }

    /// Withdraws a cancelled caller's item if its batch is still open. Returns whether it was.
    @usableFromInline
    mutating func withdraw(_ outcome: BatchOutcome<Output>, slot: Int) -> Bool {
        guard open.outcome === outcome else { return false }
        if open.withdrawn.isEmpty {
            open.withdrawn = Array(repeating: false, count: open.items.count)
        }
        guard !open.withdrawn[slot] else { return false }
        open.withdrawn[slot] = true
        open.live -= 1
        stats.withdrawn += 1
        if open.live == 0 {
            // Nothing left to send: discard the batch (the timer finds its generation gone).
            open = OpenBatch()
        }
        return true
    }

    /// Moves the open batch to `sealed`, dropping withdrawn slots.
    @usableFromInline
    mutating func seal(_ reason: FlushReason) {
        guard open.isOpen else { return }
        var batch = OpenBatch()
        swap(&batch, &open)
        switch reason {
        case .size: stats.flushedBySize += 1
        case .delay: stats.flushedByDelay += 1
        case .shutdown: stats.flushedByShutdown += 1
        }
        if batch.withdrawn.isEmpty {
            sealed.append(SealedBatch(items: batch.items, outcome: batch.outcome!, slotToOutput: nil))
            return
        }
        var items: [Item] = []
        items.reserveCapacity(batch.live)
        var slotToOutput: [Int] = []
        slotToOutput.reserveCapacity(batch.items.count)
        for (slot, item) in batch.items.enumerated() {
            if batch.withdrawn[slot] {
                slotToOutput.append(-1)
            } else {
                slotToOutput.append(items.count)
                items.append(item)
            }
        }
        sealed.append(SealedBatch(items: items, outcome: batch.outcome!, slotToOutput: slotToOutput))
    }

    // MARK: The timer

    @usableFromInline
    mutating func timerNext(_ continuation: UnsafeContinuation<TimerAction, Never>) -> (UnsafeContinuation<TimerAction, Never>, TimerAction)? {
        if isFinished || isShutDown { return (continuation, .exit) }
        if open.isOpen, !open.isDue, let deadline = open.deadline {
            return (continuation, .sleep(until: deadline, generation: open.generation))
        }
        timer = continuation
        return nil
    }

    @usableFromInline
    mutating func timerFired(generation: Int) -> Wake {
        var wake = Wake()
        if open.isOpen && open.generation == generation {
            open.isDue = true  // sealed by the supervisor as soon as a handler slot is free
            wake.supervisor = supervisorWake()
        }
        return wake
    }

    // MARK: The supervisor

    @usableFromInline
    mutating func runStarting() {
        precondition(!runStarted, "Batcher.run(): run() may be called only once in a batcher's life")
        runStarted = true
    }

    /// What the supervisor does next, or nil after parking it.
    @usableFromInline
    mutating func supervisorNext(_ continuation: UnsafeContinuation<SupervisorAction, Never>) -> (UnsafeContinuation<SupervisorAction, Never>, SupervisorAction)? {
        if let action = nextSupervisorAction() { return (continuation, action) }
        supervisor = continuation
        return nil
    }

    @usableFromInline
    mutating func nextSupervisorAction() -> SupervisorAction? {
        if running < maxConcurrentBatches && sealed.isEmpty && open.isDue {
            seal(.delay)
        }
        if running < maxConcurrentBatches, let batch = sealed.popFirst() {
            running += 1
            stats.batches += 1
            stats.peakConcurrentBatches = Swift.max(stats.peakConcurrentBatches, running)
            return .dispatch(batch)
        }
        if isShutDown && !open.isOpen && sealed.isEmpty && running == 0 {
            isFinished = true
            return .finished
        }
        return nil
    }

    /// The parked supervisor with its next action, if it now has one.
    @usableFromInline
    mutating func supervisorWake() -> (UnsafeContinuation<SupervisorAction, Never>, SupervisorAction)? {
        guard let continuation = supervisor, let action = nextSupervisorAction() else { return nil }
        supervisor = nil
        return (continuation, action)
    }

    @usableFromInline
    mutating func batchFinished(items: Int, failed: Bool) -> Wake {
        running -= 1
        if failed {
            stats.failed += items
            stats.failedBatches += 1
        } else {
            stats.handled += items
        }
        var wake = Wake()
        wake.supervisor = supervisorWake()
        return wake
    }

    // MARK: Shutdown

    @usableFromInline
    mutating func shutdown() -> Wake {
        var wake = Wake()
        guard !isShutDown else { return wake }
        isShutDown = true
        seal(.shutdown)
        wake.supervisor = supervisorWake()
        if let timer = self.timer {
            self.timer = nil
            wake.timer = (timer, .exit)
        }
        return wake
    }

    @usableFromInline
    var snapshot: BatcherStats {
        var stats = self.stats
        stats.buffered = open.live + sealed.reduce(0) { $0 + $1.items.count }
        stats.inFlightBatches = running
        return stats
    }
}

/// What the callers of one batch wait on: its result, behind its own lock (waiting for a
/// result never contends with submitters).
///
/// Waiters are few (the callers still waiting when the batch completes), so they live in a
/// small array; removal on cancellation is linear in it.
@usableFromInline
final class BatchOutcome<Output: Sendable>: Sendable {
    @usableFromInline
    struct State {
        /// The handler's outputs, or its failure; nil while pending.
        @usableFromInline
        var result: Result<[Output], any Error>?
        /// Slot → index in the outputs, when some slots were withdrawn.
        @usableFromInline
        var slotToOutput: [Int]?
        /// Resumed with nil when cancelled (the waiting task then makes its error: task-locals
        /// are not the waiter's inside a cancellation handler).
        @usableFromInline
        var waiters: [(id: Int, slot: Int, continuation: UnsafeContinuation<Result<Output, any Error>?, Never>)] = []
        @usableFromInline
        var nextWaiterID = 0

        @inlinable
        init() {}

        @inlinable
        /// The result for `slot`; nil for a withdrawn slot (its caller was cancelled: the
        /// withdrawal and the waiter's removal are two steps, and the batch may complete
        /// between them).
        func value(at slot: Int) -> Result<Output, any Error>? {
            switch result! {
            case .success(let outputs):
                let index = slotToOutput?[slot] ?? slot
                return index < 0 ? nil : .success(outputs[index])
            case .failure(let error):
                return .failure(error)
            }
        }
    }

    @usableFromInline
    let state = LockedState(State())

    /// The result once the batch is complete, for callers that come after: written once,
    /// before `isComplete` is set (releasing), and read only after `isComplete` is seen
    /// (acquiring), so without the lock. Most callers collect their result long after their
    /// batch completed, and a hundred of them (from as many tasks) share this object: taking
    /// its lock twice each made the adders of batch.throughput sleep on it in the kernel.
    @usableFromInline
    nonisolated(unsafe) var completed: State?
    @usableFromInline
    let isComplete = Atomic<Bool>(false)

    @usableFromInline
    init() {}

    /// The result for `slot`, waiting for the batch to complete. `onCancel` runs (before the
    /// waiter is resumed) when the calling task is cancelled.
    @inlinable
    func value(slot: Int, onCancel: @escaping @Sendable () -> Void) async throws -> Output {
        for attempt in 0..<2 {
            if isComplete.load(ordering: .acquiring) {
                // Read in place: a copy of the outcome would retain the outputs' buffer, one
                // reference count for the whole batch, bounced between the callers' cores.
                guard let result = completed.unsafelyUnwrapped.value(at: slot) else { throw DeadlineContext.cancellationError() }
                return try result.get()
            }
            // Not complete yet: yield once (its handler may be finishing on the other core)
            // before waiting, which costs a park and a wake-up.
            if attempt == 0 { await Task.yield() }
        }
        let id: Int? = state.withLock { state in
            if state.result != nil { return nil }
            defer { state.nextWaiterID += 1 }
            return state.nextWaiterID
        }
        guard let id else {
            guard let result = state.withLock({ $0.value(at: slot) }) else { throw DeadlineContext.cancellationError() }
            return try result.get()
        }
        let result = await withTaskCancellationHandler {
            await withUnsafeContinuation { (continuation: UnsafeContinuation<Result<Output, any Error>?, Never>) in
                let now: Result<Output, any Error>?? = state.withLock { state in
                    if state.result != nil { return .some(state.value(at: slot)) }  // nil: withdrawn
                    // Checked under the lock: a cancellation after this finds the waiter.
                    if Task.isCancelled { return .some(nil) }
                    state.waiters.append((id, slot, continuation))
                    return nil
                }
                if let now { continuation.resume(returning: now) }
            }
        } onCancel: {
            onCancel()
            let continuation = state.withLock { state in
                state.waiters.firstIndex { $0.id == id }.map { state.waiters.remove(at: $0).continuation }
            }
            continuation?.resume(returning: nil)
        }
        guard let result else { throw DeadlineContext.cancellationError() }
        return try result.get()
    }

    /// Stores the batch's result and resumes its waiters.
    @usableFromInline
    func complete(_ result: Result<[Output], any Error>, slotToOutput: [Int]?) {
        var published = State()
        published.result = result
        published.slotToOutput = slotToOutput
        completed = published
        isComplete.store(true, ordering: .releasing)
        let resumptions = state.withLock { state in
            state.result = result
            state.slotToOutput = slotToOutput
            defer { state.waiters.removeAll() }
            return state.waiters.map { ($0.continuation, state.value(at: $0.slot)) }
        }
        for (continuation, value) in resumptions { continuation.resume(returning: value) }
    }
}
