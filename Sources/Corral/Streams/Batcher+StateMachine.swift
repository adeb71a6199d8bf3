import DequeModule
import Synchronization

/// The storage of one batch while it takes items: a slot per item up to `maxSize`, claimed
/// without the batcher's lock.
///
/// A submitter claims a slot by incrementing `reserved`, writes its item there and stamps the
/// slot with the batch's generation. The batch is sealed under the batcher's lock — once its
/// last slot is claimed, or when it is due and a handler slot is free, or at shutdown, or
/// when every item in it is withdrawn — by setting the `closed` bit of `reserved`, after
/// which every claim fails. A failed claim still adds 1 to `reserved`: the number of claims
/// is the count read when the bit was set, never a later one. The handler worker takes the
/// items out once every claimed slot bears the batch's stamp, and gives the buffer back for
/// another batch.
///
/// Buffers are recycled and stay allocated as long as their batcher: a submitter may read
/// the batcher's current buffer, be preempted, and claim a slot in it much later. A buffer is
/// only ever open while it is the batcher's current one, so a late claim either lands in the
/// open batch of the moment (the same buffer, reopened) or fails on a closed or full one. A
/// spare buffer keeps its item storage only while few are spare (see
/// `BatcherState.spareStorageLimit`).
///
/// States: *spare* (closed, empty) → *open* (`reserved` < `closed`, the batcher's current
/// buffer) → *sealed* (closed or full; items being written by the claims made before) →
/// *collected* (items moved out, back among the spares).
@usableFromInline
final class BatchBuffer<Item: Sendable, Output: Sendable>: @unchecked Sendable {
    // @unchecked Sendable: no single lock guards every field; each has one rule, and
    // together they hand the buffer from the batcher's lock to submitters and back:
    // - `reserved` and the stamps are atomics.
    // - `outcome`, `generation`, `storage` and `stamps` (the pointer) are written only under
    //   the batcher's lock (`Batcher.state`) while the buffer is closed, before `reserved` is
    //   reset by a releasing store that opens it. A submitter reads them only after a
    //   successful claim (an acquiring increment of `reserved`), and they are not written
    //   again until the buffer has been collected, which waits for that submitter's releasing
    //   stamp. The collector clears `outcome` once it has seen every stamp, before it gives
    //   the buffer back under the lock.
    // - `storage[slot]` is initialized by the one submitter that claimed `slot`, before it
    //   stores the batch's generation in `stamps[slot]` (releasing); the collector moves it out
    //   after it has seen every claimed slot stamped (acquiring).
    // - `withdrawn` and `isCollected` are read and written only under the batcher's lock.

    /// The bit of `reserved` that closes the buffer: every claim then fails (`>= capacity`).
    @usableFromInline static var closed: Int { 1 << 62 }

    /// Slots claimed (the count may run past `capacity` with failed claims), and `closed`.
    @usableFromInline let reserved = Atomic<Int>(BatchBuffer.closed)
    // The vars a submitter reads are exempt from dynamic exclusivity checks (the rules above
    // order every access), which would cost a third of the claim.
    /// The result of the batch the buffer holds.
    @usableFromInline @exclusivity(unchecked) var outcome: BatchOutcome<Output>?
    /// Room for `capacity` items; nil while spare without storage.
    @usableFromInline @exclusivity(unchecked) var storage: UnsafeMutablePointer<Item>?
    /// Per slot, the generation of the last batch whose item was written there. A stamp is a
    /// plain store; a shared count of written items was a second contended atomic increment
    /// per item, on the line every claim increments.
    @usableFromInline @exclusivity(unchecked) var stamps: UnsafeMutablePointer<Atomic<Int>>?
    @usableFromInline let capacity: Int
    /// Which batch the buffer holds: the batcher's count of batches opened.
    @usableFromInline @exclusivity(unchecked) var generation = 0
    /// Slots whose caller was cancelled before the batch was collected.
    @usableFromInline var withdrawn: [Int] = []
    /// The items have been taken out for the handler: too late to withdraw one.
    @usableFromInline var isCollected = false

    @usableFromInline
    init(capacity: Int) {
        self.capacity = capacity
    }

    deinit {
        // Collected buffers hold no items: only the storage is left to free.
        freeStorage()
    }

    @usableFromInline
    func allocateStorage() {
        storage = .allocate(capacity: capacity)
        let stamps = UnsafeMutablePointer<Atomic<Int>>.allocate(capacity: capacity)
        for slot in 0..<capacity { (stamps + slot).initialize(to: Atomic(0)) }
        self.stamps = stamps
    }

    /// Frees the item storage of a buffer that holds no items.
    @usableFromInline
    func freeStorage() {
        storage?.deallocate()
        storage = nil
        stamps?.deinitialize(count: capacity)
        stamps?.deallocate()
        stamps = nil
    }

    /// Claims a slot, or nil when the buffer is full or closed.
    @inlinable
    func claim() -> Int? {
        let slot = reserved.wrappingAdd(1, ordering: .acquiring).oldValue
        return slot < capacity ? slot : nil
    }

    /// Writes the item of a claimed slot; returns the batch's outcome and generation.
    @inlinable
    func write(_ item: Item, at slot: Int) -> (outcome: BatchOutcome<Output>, generation: Int) {
        // The outcome must be retained before the stamp: once the slot is stamped, the
        // collector may drop the buffer's reference, and the other holders may be gone too.
        // A plain copy of `outcome` lets the optimizer sink its retain below the stamp (it
        // did: tickets then read freed outcomes); a call it cannot see into keeps it above.
        let unretained = Unmanaged.passUnretained(outcome.unsafelyUnwrapped).toOpaque()
        let retained = Unmanaged<BatchOutcome<Output>>.fromOpaque(retainOpaquely(unretained))
        let placed = (retained.takeRetainedValue(), generation)
        (storage.unsafelyUnwrapped + slot).initialize(to: item)
        (stamps.unsafelyUnwrapped + slot).pointee.store(generation, ordering: .releasing)
        return placed
    }

    /// Opens the buffer for batch `generation`, with slot 0 claimed by the caller. Call under
    /// the batcher's lock, with the buffer spare.
    @inlinable
    func open(generation: Int, outcome: BatchOutcome<Output>) {
        if storage == nil { allocateStorage() }
        self.outcome = outcome
        self.generation = generation
        withdrawn.removeAll()
        isCollected = false
        reserved.store(1, ordering: .releasing)
    }

    /// Slots claimed so far (at most `capacity`).
    @inlinable
    var claimed: Int {
        Swift.min(reserved.load(ordering: .relaxed) & (Self.closed - 1), capacity)
    }

    /// Closes the buffer if exactly `count` slots are claimed; returns whether it did. Call
    /// under the batcher's lock.
    @inlinable
    func close(ifClaimed count: Int) -> Bool {
        reserved.compareExchange(expected: count, desired: count | Self.closed, ordering: .relaxed).exchanged
    }

    /// Closes the buffer; returns how many slots were claimed (at most `capacity`). Call under
    /// the batcher's lock.
    @inlinable
    func close() -> Int {
        Swift.min(reserved.bitwiseOr(Self.closed, ordering: .relaxed).oldValue & (Self.closed - 1), capacity)
    }

    /// Waits until the `count` slots claimed before the buffer closed are written, then
    /// moves their items out and lets go of the outcome. A claim's write takes nanoseconds,
    /// unless its thread was preempted between the claim and the stamp: hence the yield.
    @inlinable
    func takeItems(count: Int) async -> [Item] {
        while true {
            if let items = takeItemsIfWritten(count: count) { return items }
            await Task.yield()
        }
    }

    /// The items, moved out, once the `count` claimed slots are written; nil before.
    @inlinable
    func takeItemsIfWritten(count: Int) -> [Item]? {
        let stamps = self.stamps.unsafelyUnwrapped
        for slot in 0..<count where (stamps + slot).pointee.load(ordering: .acquiring) != generation { return nil }
        let storage = self.storage.unsafelyUnwrapped
        // No submitter reads `outcome` any more (each read it before its stamp); the next
        // batch's is set under the lock. Released here, outside it: the outputs it may hold
        // are the user's values.
        outcome = nil
        // One move of the whole run: this code is not specialized for `Item`, and a loop
        // would look up its metadata item by item.
        return Array(unsafeUninitializedCapacity: count) { items, initialized in
            items.baseAddress.unsafelyUnwrapped.moveInitialize(from: storage, count: count)
            initialized = count
        }
    }
}

/// Retains the object at `pointer` and returns the pointer. Not inlinable, and never inlined:
/// the caller's optimizer sees a call that may touch any memory, so the retain stays before
/// the stores that follow the call (``BatchBuffer/write(_:at:)``).
@inline(never)
@usableFromInline
func retainOpaquely(_ pointer: UnsafeMutableRawPointer) -> UnsafeMutableRawPointer {
    _ = Unmanaged<AnyObject>.fromOpaque(pointer).retain()
    return pointer
}

/// The state of a ``Batcher`` behind its lock: the open batch's buffer and deadline, the
/// sealed batches waiting for a handler slot, and the tasks of `run()` that act on them: the
/// handler workers (at most `maxConcurrentBatches`, each calling the handler for one batch
/// after another), the supervisor, which starts a worker when a batch could start and none
/// is idle, and the timer, which marks a batch due `maxDelay` after its first item.
///
/// Items do not pass through this state: submitters claim slots in the open batch's buffer
/// without the lock (``BatchBuffer``), and come here only to open a batch (there is none, or
/// it is full), to seal one they filled, or to withdraw an item.
///
/// A batch is *open* while it takes items; *due* once `maxDelay` has passed since its first
/// item (still open, so that items arriving while every handler slot is busy join it);
/// *sealed* once it is full, due with a handler slot free, or flushed by shutdown;
/// *dispatched* when a worker takes it (`running` counts those); *collected* when the worker
/// has taken its items (withdrawals stop there). Its callers wait on its `BatchOutcome`,
/// which has its own lock.
///
/// Invariants: at most one open batch, whose buffer is the one published to submitters
/// (`Batcher.current`); `running <= workers <= maxConcurrentBatches`; no worker is idle while
/// a batch could start (`dispatch(into:)` runs after every event that may let one start); the
/// supervisor is parked only while it has nothing to do; the timer is parked only while no
/// batch is open or the open one is due; after shutdown no batch opens.
///
/// Transitions ("dispatch": hand each batch that can start — a sealed one, or the open one if
/// it is due and none is sealed — to an idle worker, else have the parked supervisor start a
/// worker for it if fewer than `maxConcurrentBatches` run; then finish if shut down with
/// nothing open, sealed or running):
///
/// | event                  | condition                               | effect |
/// |------------------------|-----------------------------------------|--------|
/// | claim (no lock)        | the open buffer has a free slot         | the item is written there; whoever claims the last slot seals it (`filled`) |
/// | `enqueue(item)`        | shut down                               | refused (`BatcherError.shutdown`) |
/// | (claim failed)         | the open buffer has a free slot         | claim it |
/// |                        | otherwise                               | seal a full open batch (by size), dispatch; open one due at `now + maxDelay`, slot 0 claimed; wake the parked timer |
/// | `filled(buffer, g)`    | batch `g` is still the open one         | seal it (by size); dispatch |
/// | `withdraw(buffer, g, slot)` | batch `g` not yet collected        | mark the slot withdrawn; if every item of the open batch is, seal it (no flush: its worker makes no handler call) and dispatch |
/// |                        | collected                               | nothing: the item is handled, its result discarded |
/// | `timerNext`            | finished                                | `.exit` |
/// |                        | a batch is open and not yet due         | `.sleep(until: its deadline, generation)` |
/// |                        | otherwise                               | park |
/// | `timerFired(g)`        | the open batch has generation `g`       | mark it *due* (it goes on taking items until a handler slot is free); dispatch |
/// | `supervisorNext`       | no idle worker, fewer than the most, a batch can start | `.startWorker(batch)`: `workers += 1`, `running += 1` |
/// |                        | finished (or now finishing)             | `.finished`: `run()` stops the timer |
/// |                        | otherwise                               | park |
/// | `collected(buffer)`    | —                                       | mark it collected, take its withdrawals; it becomes spare |
/// | `workerFinished`       | a batch can start                       | `.handle(batch)` to the same worker |
/// |                        | finished (or now finishing)             | `.exit`, `workers -= 1` |
/// |                        | otherwise                               | park, idle |
/// | `shutdown`             | not yet shut down                       | refuse new items; seal the open batch (by shutdown); dispatch; stop the parked timer |
///
/// Finishing tells the idle workers to exit and the parked supervisor `.finished`.
///
/// Sealing closes the buffer: claims made before it are in the batch (the handler worker
/// waits for their writes), claims after it fail and come here.
@usableFromInline
struct BatcherState<Item: Sendable, Output: Sendable, C: Clock> {
    @usableFromInline typealias Buffer = BatchBuffer<Item, Output>

    @usableFromInline
    enum FlushReason {
        case size, delay, shutdown
        /// Every caller was cancelled (not a flush: unless an item came in the meantime,
        /// no handler call follows).
        case withdrawn
    }

    @usableFromInline
    struct SealedBatch: Sendable {
        @usableFromInline let buffer: Buffer
        /// Slots claimed in it.
        @usableFromInline let count: Int
        @usableFromInline let outcome: BatchOutcome<Output>

        @inlinable
        init(buffer: Buffer, count: Int, outcome: BatchOutcome<Output>) {
            self.buffer = buffer
            self.count = count
            self.outcome = outcome
        }
    }

    @usableFromInline
    enum SupervisorAction: Sendable {
        /// Start a handler worker, with its first batch.
        case startWorker(SealedBatch)
        case finished
    }

    @usableFromInline
    enum WorkerAction: Sendable {
        case handle(SealedBatch)
        case exit
    }

    @usableFromInline
    enum TimerAction: Sendable {
        case sleep(until: C.Instant, generation: Int)
        case exit
    }

    /// Spare buffers that keep their item storage; the others free it (and allocate it again
    /// when reopened), so that a burst of sealed batches does not hold its memory for ever.
    @usableFromInline static var spareStorageLimit: Int { 4 }

    @usableFromInline let maxSize: Int
    @usableFromInline let maxDelay: C.Duration
    @usableFromInline let maxConcurrentBatches: Int
    @usableFromInline let clock: C
    /// Where submitters find the open buffer: `Unmanaged` bits, 0 when no batch is open.
    @usableFromInline let current: PaddedAtomics

    /// The open batch's buffer, nil when none is open.
    @usableFromInline var open: Buffer?
    @usableFromInline var openDeadline: C.Instant?
    /// Its delay has passed, but no handler slot was free: it goes on taking items until
    /// it is full or a slot frees, whichever comes first.
    @usableFromInline var openIsDue = false
    /// Batches opened so far; the open one's generation.
    @usableFromInline var generation = 0
    @usableFromInline var sealed: Deque<SealedBatch> = []
    /// Every buffer made: they live as long as the batcher (see ``BatchBuffer``).
    @usableFromInline var buffers: [Buffer] = []
    @usableFromInline var spare: [Buffer] = []
    /// Batches handed to a worker and not finished.
    @usableFromInline var running = 0
    /// Handler workers started and not exited (at most `maxConcurrentBatches`).
    @usableFromInline var workers = 0
    /// Workers waiting for a batch, the last to finish last.
    @usableFromInline var idleWorkers: [UnsafeContinuation<WorkerAction, Never>] = []
    @usableFromInline var runStarted = false
    @usableFromInline var isShutDown = false
    @usableFromInline var isFinished = false
    @usableFromInline var supervisor: UnsafeContinuation<SupervisorAction, Never>?
    @usableFromInline var timer: UnsafeContinuation<TimerAction, Never>?
    /// Counters; `submitted` counts sealed batches' items (the open one's are added by
    /// `snapshot`).
    @usableFromInline var stats = BatcherStats()

    @usableFromInline
    init(maxSize: Int, maxDelay: C.Duration, maxConcurrentBatches: Int, clock: C, current: PaddedAtomics) {
        self.maxSize = maxSize
        self.maxDelay = maxDelay
        self.maxConcurrentBatches = maxConcurrentBatches
        self.clock = clock
        self.current = current
    }

    // MARK: Submitters

    @usableFromInline
    enum EnqueueResult {
        /// A slot claimed in `buffer`: the caller writes its item there (after the lock).
        case claimed(Buffer, slot: Int, wake: Wake)
        case refused
    }

    /// Continuations to resume once the lock is released.
    @usableFromInline
    struct Wake {
        @usableFromInline var supervisor: (UnsafeContinuation<SupervisorAction, Never>, SupervisorAction)?
        @usableFromInline var timer: (UnsafeContinuation<TimerAction, Never>, TimerAction)?
        /// Idle workers handed a batch.
        @usableFromInline var workers: [(UnsafeContinuation<WorkerAction, Never>, WorkerAction)] = []
        /// Idle workers told to exit (the batcher is finished).
        @usableFromInline var exiting: [UnsafeContinuation<WorkerAction, Never>] = []

        @inlinable
        init() {}

        @inlinable
        func resume() {
            for (continuation, action) in workers { continuation.resume(returning: action) }
            for continuation in exiting { continuation.resume(returning: .exit) }
            if let (continuation, action) = supervisor { continuation.resume(returning: action) }
            if let (continuation, action) = timer { continuation.resume(returning: action) }
        }
    }

    /// A slot for an item whose claim without the lock failed: in the open batch if it has
    /// room, else in a new batch (sealing the full one).
    @inlinable
    mutating func enqueue() -> EnqueueResult {
        guard !isShutDown else { return .refused }
        var wake = Wake()
        if let open {
            if let slot = open.claim() { return .claimed(open, slot: slot, wake: wake) }
            // Full: its filler is on its way here to seal it; seal it now instead.
            seal(.size)
            dispatch(into: &wake)
        }
        generation += 1
        let buffer = spare.popLast() ?? makeBuffer()
        buffer.open(generation: generation, outcome: BatchOutcome())
        let deadline = clock.now.advanced(by: maxDelay)
        open = buffer
        openDeadline = deadline
        openIsDue = false
        current[0].pointee.store(Int(bitPattern: Unmanaged.passUnretained(buffer).toOpaque()), ordering: .releasing)
        if let timer = self.timer {
            self.timer = nil
            wake.timer = (timer, .sleep(until: deadline, generation: generation))
        }
        return .claimed(buffer, slot: 0, wake: wake)
    }

    @inlinable
    mutating func makeBuffer() -> Buffer {
        let buffer = Buffer(capacity: maxSize)
        buffers.append(buffer)
        return buffer
    }

    /// The submitter that claimed the last slot of batch `generation` seals it, unless a
    /// submitter that found it full or the supervisor did already.
    @inlinable
    mutating func filled(_ buffer: Buffer, generation: Int) -> Wake {
        var wake = Wake()
        if open === buffer && buffer.generation == generation {
            seal(.size)
            dispatch(into: &wake)
        }
        return wake
    }

    /// Withdraws a cancelled caller's item if its batch has not been collected. An open batch
    /// left with no item is sealed at once (its handler worker makes no call), so that the
    /// next item opens a fresh one.
    @inlinable
    mutating func withdraw(_ buffer: Buffer, generation: Int, slot: Int) -> Wake {
        var wake = Wake()
        guard buffer.generation == generation, !buffer.isCollected, !buffer.withdrawn.contains(slot) else { return wake }
        buffer.withdrawn.append(slot)
        stats.withdrawn += 1
        // Closed only if no claim came meanwhile (a claim in flight keeps the batch open).
        if open === buffer && buffer.close(ifClaimed: buffer.withdrawn.count) {
            // Sealed with the count it was closed at: a claim failing on it since has
            // counted itself in `reserved` all the same.
            seal(.withdrawn, closedWith: buffer.withdrawn.count)
            dispatch(into: &wake)
        }
        return wake
    }

    /// Closes the open batch and queues it for a handler slot. `claims`: the buffer is closed
    /// already, with that many slots claimed.
    @inlinable
    mutating func seal(_ reason: FlushReason, closedWith claims: Int? = nil) {
        guard let buffer = open else { return }
        let count = claims ?? buffer.close()
        open = nil
        openDeadline = nil
        openIsDue = false
        current[0].pointee.store(0, ordering: .releasing)
        switch count == maxSize ? .size : reason {
        case .size: stats.flushedBySize += 1
        case .delay: stats.flushedByDelay += 1
        case .shutdown: stats.flushedByShutdown += 1
        case .withdrawn: break
        }
        stats.submitted += count
        sealed.append(SealedBatch(buffer: buffer, count: count, outcome: buffer.outcome.unsafelyUnwrapped))
    }

    /// The handler worker has taken the `count` items of a batch out of its buffer: no
    /// withdrawal from now on. Returns the withdrawn slots; the buffer becomes spare.
    @inlinable
    mutating func collected(_ buffer: Buffer, count: Int) -> [Int] {
        buffer.isCollected = true
        let withdrawn = buffer.withdrawn
        buffer.withdrawn = []
        if count == withdrawn.count { stats.batches -= 1 }  // no handler call after all
        if spare.count >= Self.spareStorageLimit { buffer.freeStorage() }
        spare.append(buffer)
        return withdrawn
    }

    /// A collected batch's items without the withdrawn slots, and the map from slot to index
    /// in the handler's items and outputs (nil when none was withdrawn; -1 for those that
    /// were).
    @inlinable
    static func removing(_ withdrawn: [Int], from items: [Item]) -> (items: [Item], slotToOutput: [Int]?) {
        guard !withdrawn.isEmpty else { return (items, nil) }
        var map = Array(repeating: 0, count: items.count)
        for slot in withdrawn { map[slot] = -1 }
        var live: [Item] = []
        live.reserveCapacity(items.count - withdrawn.count)
        for (slot, item) in items.enumerated() where map[slot] == 0 {
            map[slot] = live.count
            live.append(item)
        }
        return (live, map)
    }

    // MARK: The timer

    @inlinable
    mutating func timerNext(_ continuation: UnsafeContinuation<TimerAction, Never>) -> (UnsafeContinuation<TimerAction, Never>, TimerAction)? {
        if isFinished || isShutDown { return (continuation, .exit) }
        if let open, !openIsDue, let openDeadline {
            return (continuation, .sleep(until: openDeadline, generation: open.generation))
        }
        timer = continuation
        return nil
    }

    @inlinable
    mutating func timerFired(generation: Int) -> Wake {
        var wake = Wake()
        if let open, open.generation == generation {
            openIsDue = true  // sealed as soon as a handler slot is free
            dispatch(into: &wake)
        }
        return wake
    }

    // MARK: The supervisor

    @inlinable
    mutating func runStarting() {
        precondition(!runStarted, "Batcher.run(): run() may be called only once in a batcher's life")
        runStarted = true
    }

    /// The next sealed batch for a handler, if a handler slot is free (the open batch is
    /// sealed first if it is due and no other batch waits). Call only with a worker to give it
    /// to.
    @inlinable
    mutating func takeBatch() -> SealedBatch? {
        guard running < maxConcurrentBatches else { return nil }
        if sealed.isEmpty && openIsDue { seal(.delay) }
        guard let batch = sealed.popFirst() else { return nil }
        running += 1
        stats.batches += 1
        stats.peakConcurrentBatches = Swift.max(stats.peakConcurrentBatches, running)
        return batch
    }

    /// Hands the batches that can start to idle workers, or has the parked supervisor start a
    /// worker for one; finishes when shut down and done. Keeps the invariant: no worker is
    /// idle while a batch could start.
    @inlinable
    mutating func dispatch(into wake: inout Wake) {
        while let worker = idleWorkers.last, let batch = takeBatch() {
            idleWorkers.removeLast()
            wake.workers.append((worker, .handle(batch)))
        }
        if idleWorkers.isEmpty && workers < maxConcurrentBatches, let supervisor, let batch = takeBatch() {
            self.supervisor = nil
            workers += 1
            wake.supervisor = (supervisor, .startWorker(batch))
        }
        finishIfDone(into: &wake)
    }

    /// Once shut down with every batch handled: tells the idle workers to exit and the
    /// supervisor that `run()` is done.
    @inlinable
    mutating func finishIfDone(into wake: inout Wake) {
        guard !isFinished, isShutDown, open == nil, sealed.isEmpty, running == 0 else { return }
        isFinished = true
        workers -= idleWorkers.count
        wake.exiting = idleWorkers
        idleWorkers.removeAll()
        if let supervisor {
            self.supervisor = nil
            wake.supervisor = (supervisor, .finished)
        }
    }

    /// What the supervisor does next (nil: parked), and whom to wake.
    @inlinable
    mutating func supervisorNext(
        _ continuation: UnsafeContinuation<SupervisorAction, Never>
    ) -> (next: (UnsafeContinuation<SupervisorAction, Never>, SupervisorAction)?, wake: Wake) {
        var wake = Wake()
        if idleWorkers.isEmpty && workers < maxConcurrentBatches, let batch = takeBatch() {
            workers += 1
            return ((continuation, .startWorker(batch)), wake)
        }
        finishIfDone(into: &wake)
        if isFinished { return ((continuation, .finished), wake) }
        supervisor = continuation
        return (nil, wake)
    }

    /// A worker is done with a batch: its handler call returned, or none was made (`items ==
    /// 0`: every item was withdrawn). What it does next (nil: parked, idle), and whom to wake.
    @inlinable
    mutating func workerFinished(
        items: Int, failed: Bool, _ continuation: UnsafeContinuation<WorkerAction, Never>
    ) -> (next: (UnsafeContinuation<WorkerAction, Never>, WorkerAction)?, wake: Wake) {
        running -= 1
        if failed {
            stats.failed += items
            stats.failedBatches += 1
        } else {
            stats.handled += items
        }
        var wake = Wake()
        if let batch = takeBatch() { return ((continuation, .handle(batch)), wake) }
        finishIfDone(into: &wake)
        if isFinished {
            workers -= 1
            return ((continuation, .exit), wake)
        }
        idleWorkers.append(continuation)
        return (nil, wake)
    }

    // MARK: Shutdown

    @inlinable
    mutating func shutdown() -> Wake {
        var wake = Wake()
        guard !isShutDown else { return wake }
        isShutDown = true
        seal(.shutdown)
        dispatch(into: &wake)
        if let timer = self.timer {
            self.timer = nil
            wake.timer = (timer, .exit)
        }
        return wake
    }

    @inlinable
    var snapshot: BatcherStats {
        var stats = self.stats
        let openCount = open?.claimed ?? 0
        stats.submitted += openCount
        stats.buffered = openCount - (open?.withdrawn.count ?? 0)
            + sealed.reduce(0) { $0 + $1.count - $1.buffer.withdrawn.count }
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
            // A withdrawn slot first: its caller was cancelled, whatever became of the batch.
            let index = slotToOutput?[slot] ?? slot
            guard index >= 0 else { return nil }
            switch result! {
            case .success(let outputs): return .success(outputs[index])
            case .failure(let error): return .failure(error)
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
    @usableFromInline @exclusivity(unchecked)  // read by every caller: no dynamic check
    nonisolated(unsafe) var completed: State?
    @usableFromInline
    let isComplete = Atomic<Bool>(false)

    @usableFromInline
    init() {}

    /// The result for `slot`, waiting for the batch to complete. `onCancel` runs (before the
    /// waiter is resumed) when the calling task is cancelled.
    @inlinable
    nonisolated(nonsending)
    func value(slot: Int, onCancel: @Sendable () -> Void) async throws -> Output {
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
    @inlinable
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
