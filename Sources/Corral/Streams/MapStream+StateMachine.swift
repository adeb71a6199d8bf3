import DequeModule
import Synchronization

/// The state of one iteration of `map(concurrency:ordered:buffer:_:)` under the lock: one
/// feeder task pulls the source into `input`, `concurrency` worker tasks transform from
/// `input`, and the consumer (the iterator's `next()`) parks here when no result is ready.
/// With `concurrency == 1` a lone worker pulls and transforms itself (no feeder, no
/// `input`): half the tasks and hand-offs of a pipeline stage.
///
/// Results do not go through the lock: they travel through a ``MapStreamRing`` of `window`
/// slots, each result published by its producer and taken by the consumer without a lock
/// (the ring's comment has the protocol). The lock is taken on the hot path only by the
/// feeder (one element at a time into `input`) and by the workers (a chunk at a time out of
/// it); everything else — parking, waking, ending — goes through the lock, so a decision
/// to park is never made on stale state. (DESIGN.md keeps all state behind one lock; this
/// engine moves the results out of it, because the lock was a quarter of map.ordered's
/// time.)
///
/// Flow control is a window of credits: the feeder pulls an element only while fewer than
/// `window` elements are taken from the source and not yet returned by `next()`. The
/// consumer hands credits back through the ring's `delivered` counter (a quarter window at
/// a time, and everything it holds before it parks). So the ring never holds more than
/// `window` results, and a result's slot (its index, or its ticket in completion order,
/// modulo `window`) is always free when it is written.
///
/// Tickets: the n-th result the consumer takes has ticket n. In ordered mode an element's
/// ticket is its index in the source; otherwise a worker draws the next ticket when its
/// result is ready (a lone worker's results are in order either way).
///
/// Invariants: `fed - delivered <= window` (a lone worker keeps `fed` itself, and stores it
/// here when it parks or ends); a parked worker exists only while `input` is
/// empty; the consumer is parked only while the ring's slot for its ticket is empty and
/// the iteration is neither drained nor over, and then the ring's `consumerWaitsFor` holds
/// that ticket (it is -1 otherwise).
///
/// Transitions (the iteration is *over* once it failed or the consumer ended it; the
/// ring's `over` flag mirrors that for the lock-free paths):
///
/// | event                        | condition                         | effect |
/// |------------------------------|-----------------------------------|--------|
/// | `feederMayPull(delivered)`   | over                              | `.stop` |
/// |                              | `fed - delivered < window`        | `.pull` |
/// |                              | otherwise                         | `.wait` (then it parks) |
/// | feeder parks (`waitForRoom`) | over / room (re-checked after raising `feederWaits`) | resume at once with false / true |
/// |                              | otherwise                         | park; the consumer's credit report wakes it |
/// | `elementArrived(e)`          | over                              | dropped; the feeder stops |
/// |                              | —                                 | append to `input`; wake an idle worker unless enough are already waking |
/// | `sourceEnded(fed)`           | —                                 | (a lone worker passes its count); wake every idle worker (it takes what is left or exits); wake the consumer if it waits for ticket `fed` (drained) |
/// | `workerTake`                 | over                              | `.exit` |
/// |                              | `input` non-empty                 | take a chunk, `.work` |
/// |                              | source ended                      | `.exit` |
/// |                              | otherwise                         | `.wait`: the worker yields once and looks again, then parks (`workerParked`) |
/// | result published (no lock)   | the consumer waits for its ticket | take the lock and wake it |
/// | `consumerCheck(ticket)`      | failed / ended / drained (`sourceHasEnded && fed == ticket`) | `.failed` / `.finished` / `.finished` |
/// |                              | otherwise                         | `.wait`: the consumer yields once and looks again (a park and its wake-up cost far more), then parks |
/// | consumer parks (`consumerWait`) | over, drained, cancelled (the flag is cleared), or the slot filled (re-checked after publishing `consumerWaitsFor`) | resume at once |
/// |                              | otherwise                         | park |
/// | credits returned (`delivered` += n, no lock) | the feeder waits and now has room | take the lock and wake it |
/// | `consumerCancelled`          | consumer parked                   | resume it (it throws unless its result came meanwhile) |
/// | `failed(error)`              | not over                          | keep the first error; stop the feeder and idle workers; wake the consumer |
/// | `consumerEnded`              | —                                 | over: stop the feeder and idle workers (the caller cancels the tasks) |
@usableFromInline
struct MapStreamState<Element> {
    @usableFromInline let window: Int
    @usableFromInline let concurrency: Int

    @usableFromInline var input: Deque<(index: Int, element: Element)>
    /// Elements taken from the source (a lone worker keeps its own count and stores it here
    /// when it parks or ends).
    @usableFromInline var fed = 0
    @usableFromInline var sourceHasEnded = false
    /// The first error of the source or a transform.
    @usableFromInline var failure: (any Error)?
    /// The consumer ended the iteration (it finished, was cancelled or dropped its iterator).
    @usableFromInline var consumerHasEnded = false

    @usableFromInline var feeder: UnsafeContinuation<Bool, Never>?
    @usableFromInline var idleWorkers: [UnsafeContinuation<Bool, Never>] = []
    /// Idle workers resumed to take work that have not yet taken the lock again.
    @usableFromInline var wakingWorkers = 0
    @usableFromInline var consumer: UnsafeContinuation<Void, Never>?
    @usableFromInline var consumerWasCancelled = false

    @inlinable
    init(window: Int, concurrency: Int) {
        self.window = window
        self.concurrency = concurrency
        self.input = Deque(minimumCapacity: concurrency == 1 ? 0 : window)
    }

    @inlinable var isOver: Bool { failure != nil || consumerHasEnded }

    /// Every element's result has been taken by the consumer, whose next ticket is `ticket`.
    @inlinable
    func isDrained(at ticket: Int) -> Bool {
        sourceHasEnded && fed == ticket
    }

    // MARK: Feeder

    @usableFromInline
    enum FeederAction {
        case pull, wait, stop
    }

    @inlinable
    func feederMayPull(delivered: Int) -> FeederAction {
        if isOver { return .stop }
        return fed - delivered < window ? .pull : .wait
    }

    /// Appends a pulled element. Returns the worker to wake, if any.
    @inlinable
    mutating func elementArrived(_ element: Element) -> (accepted: Bool, worker: UnsafeContinuation<Bool, Never>?) {
        guard !isOver else { return (false, nil) }
        input.append((fed, element))
        fed += 1
        var worker: UnsafeContinuation<Bool, Never>?
        if wakingWorkers < input.count, let idle = idleWorkers.popLast() {
            wakingWorkers += 1
            worker = idle
        }
        return (true, worker)
    }

    /// The source ended after `fed` elements. Returns the idle workers to wake (each takes
    /// what is left or exits; no worker parks once the source has ended) and whether the
    /// consumer, parked for ticket `consumerWaitsFor`, is drained and must be woken.
    @inlinable
    mutating func sourceEnded(consumerWaitsFor: Int) -> (workers: [UnsafeContinuation<Bool, Never>], consumer: UnsafeContinuation<Void, Never>?) {
        sourceHasEnded = true
        var workers: [UnsafeContinuation<Bool, Never>] = []
        swap(&workers, &idleWorkers)
        wakingWorkers += workers.count
        // (The caller clears the ring's `consumerWaitsFor` when a consumer is returned.)
        return (workers, consumer != nil && isDrained(at: consumerWaitsFor) ? takeConsumer() : nil)
    }

    // MARK: Workers

    @usableFromInline
    enum WorkerAction {
        case work, wait, exit
    }

    /// How many elements a worker takes at once: one while the input is short, so that
    /// every worker gets some; a chunk when there is a backlog, so that a lock round trip
    /// is shared by several elements.
    @inlinable
    func chunkSize() -> Int {
        let share = input.count / (2 * concurrency)
        return Swift.max(1, Swift.min(share, 16))
    }

    /// A worker looks for work; `wasWoken` when it was resumed to take some.
    @inlinable
    mutating func workerTake(into batch: inout [(index: Int, element: Element)], wasWoken: Bool) -> WorkerAction {
        if wasWoken { wakingWorkers -= 1 }
        if isOver { return .exit }
        if !input.isEmpty {
            for _ in 0..<chunkSize() {
                batch.append(input.removeFirst())
            }
            return .work
        }
        return sourceHasEnded ? .exit : .wait
    }

    /// Parks an idle worker; returns the continuation to resume at once (with whether to
    /// look again) if it need not wait.
    @inlinable
    mutating func workerParked(_ continuation: UnsafeContinuation<Bool, Never>) -> (UnsafeContinuation<Bool, Never>, Bool)? {
        if isOver || (input.isEmpty && sourceHasEnded) { return (continuation, false) }
        if !input.isEmpty {
            wakingWorkers += 1
            return (continuation, true)
        }
        idleWorkers.append(continuation)
        return nil
    }

    // MARK: Consumer

    @usableFromInline
    enum ConsumerAction {
        case finished
        case failed(any Error)
        case wait
    }

    /// The consumer found no result for `ticket` in the ring.
    @inlinable
    func consumerCheck(ticket: Int) -> ConsumerAction {
        if let failure { return .failed(failure) }
        if consumerHasEnded || isDrained(at: ticket) { return .finished }
        return .wait
    }

    @inlinable
    mutating func consumerCancelled() -> UnsafeContinuation<Void, Never>? {
        consumerWasCancelled = true
        return takeConsumer()
    }

    @inlinable
    mutating func takeConsumer() -> UnsafeContinuation<Void, Never>? {
        defer { consumer = nil }
        return consumer
    }

    // MARK: Ending

    /// What to resume when the iteration is over: the feeder and idle workers (to stop),
    /// and the consumer.
    @usableFromInline
    struct Stop {
        @usableFromInline var parked: [UnsafeContinuation<Bool, Never>] = []
        @usableFromInline var consumer: UnsafeContinuation<Void, Never>?

        @inlinable init() {}

        @inlinable
        func resume() {
            for continuation in parked { continuation.resume(returning: false) }
            consumer?.resume()
        }
    }

    /// The source or a transform failed. Returns nil unless `error` is the first.
    @inlinable
    mutating func failed(_ error: any Error) -> Stop? {
        guard !isOver else { return nil }
        failure = error
        return stopEveryone()
    }

    /// The consumer ended the iteration.
    @inlinable
    mutating func consumerEnded() -> Stop {
        consumerHasEnded = true
        return stopEveryone()
    }

    @inlinable
    mutating func stopEveryone() -> Stop {
        var stop = Stop()
        swap(&stop.parked, &idleWorkers)
        if let feeder {
            stop.parked.append(feeder)
            self.feeder = nil
        }
        stop.consumer = takeConsumer()
        return stop
    }
}

/// The results of one iteration of the concurrent-map engine, in `window` slots, and the
/// counters its parties read without the lock.
///
/// The slot protocol: the result with ticket `t` goes in slot `t % window`. Its producer
/// writes the value, then stores `t` in the slot's stamp (sequentially consistent); the
/// consumer, whose next ticket is `t`, takes the value only after it loads stamp `t`
/// (acquiring), moves it out and stores -1 (empty). A slot is written again only for
/// ticket `t + window`, which the credits allow only after the consumer returned result
/// `t` and reported it through `delivered` (the chain: consumer's store, its report, the
/// feeder's pull, the lock that hands the element to a worker, the worker's write).
///
/// Parking without lost wake-ups (both sides sequentially consistent, so at least one
/// sees the other): a producer stores the stamp, then loads `consumerWaitsFor`; the
/// consumer, under the lock, stores its ticket in `consumerWaitsFor`, then loads the
/// stamp. A producer that finds its own ticket there takes the lock to wake the consumer
/// (which, under the lock, either already parked or has not yet decided). The feeder and
/// the credits work the same way with `feederWaits` and `delivered`.
///
/// A struct of pointers, so that reaching it costs no reference counting (the producers
/// and the consumer would otherwise bounce the owner's reference count, and the cache line
/// these pointers sit on, between the cores on every element). Its owner, the iteration's
/// `MapStreamCore`, calls `deallocate()` in its deinit.
@usableFromInline
struct MapStreamRing<Value>: @unchecked Sendable {
    // @unchecked Sendable: no lock guards this storage. Every stored property is a `let`;
    // the memory they point to is reached only through atomics (the slots' stamps and the
    // counters) or, for a slot's value, under the slot protocol above: one producer writes
    // it before it publishes the stamp, and one consumer reads it after it sees the stamp.
    @usableFromInline let window: Int
    /// The slots: slot `k` is `slotBytes` bytes at `slots + k * slotBytes`, its stamp first
    /// and its value at `valueOffset`, so that publishing or taking a result touches one
    /// cache line. In rings of up to 1,024 slots, each slot is padded to a cache line of its
    /// own (64 KiB at most for small values): the workers writing neighbouring tickets, and
    /// the consumer reading them, then do not take each other's lines (fan.out_in
    /// ~304 -> ~286 ns).
    @usableFromInline let slots: UnsafeMutableRawPointer
    @usableFromInline let slotBytes: Int
    @usableFromInline let valueOffset: Int
    /// The shared counters, each on cache lines of its own (see the `…Index` constants).
    @usableFromInline let counters: PaddedAtomics

    /// Credits returned by the consumer: results returned by `next()` and reported.
    @usableFromInline static var deliveredIndex: Int { 0 }
    /// The next completion-order ticket (unordered mode with several workers).
    @usableFromInline static var ticketsIndex: Int { 1 }
    /// The ticket the parked (or parking) consumer waits for, or -1.
    @usableFromInline static var consumerWaitsForIndex: Int { 2 }
    /// 1 while the feeder (or lone worker) is parked for want of credits.
    @usableFromInline static var feederWaitsIndex: Int { 3 }
    /// 1 once the iteration is over (failed or ended by the consumer).
    @usableFromInline static var overIndex: Int { 4 }
    /// A lone worker's published results, for a stage's in-flight count (see `solo()`).
    @usableFromInline static var soloFedIndex: Int { 5 }
    @usableFromInline static var counterCount: Int { 6 }
    /// Rings up to this many slots give each slot a cache line of its own.
    @usableFromInline static var paddedWindowLimit: Int { 1024 }

    @inlinable
    init(window: Int) {
        self.window = window
        let alignment = Swift.max(MemoryLayout<Atomic<Int>>.alignment, MemoryLayout<Value>.alignment)
        valueOffset = (MemoryLayout<Atomic<Int>>.stride + alignment - 1) / alignment * alignment
        var bytes = (valueOffset + MemoryLayout<Value>.stride + alignment - 1) / alignment * alignment
        if window <= Self.paddedWindowLimit { bytes = (bytes + 63) / 64 * 64 }
        slotBytes = bytes
        slots = .allocate(byteCount: window * bytes, alignment: Swift.max(64, alignment))
        for slot in 0..<window {
            (slots + slot * bytes).bindMemory(to: Atomic<Int>.self, capacity: 1).initialize(to: Atomic(-1))
            (slots + slot * bytes + valueOffset).bindMemory(to: Value.self, capacity: 1)
        }
        counters = PaddedAtomics(count: Self.counterCount)
        counters[Self.consumerWaitsForIndex].pointee.store(-1, ordering: .relaxed)
    }

    @inlinable
    func stamp(_ slot: Int) -> UnsafeMutablePointer<Atomic<Int>> {
        (slots + slot * slotBytes).assumingMemoryBound(to: Atomic<Int>.self)
    }

    @inlinable
    func value(_ slot: Int) -> UnsafeMutablePointer<Value> {
        (slots + slot * slotBytes + valueOffset).assumingMemoryBound(to: Value.self)
    }

    /// Frees the ring, with the results nobody took. Only when every party is gone.
    @usableFromInline
    func deallocate() {
        for slot in 0..<window {
            if stamp(slot).pointee.load(ordering: .acquiring) != -1 { value(slot).deinitialize(count: 1) }
            stamp(slot).deinitialize(count: 1)
        }
        slots.deallocate()
        counters.deallocate()
    }

    /// Publishes the result with ticket `ticket`. Returns whether the consumer waits for it.
    @inlinable
    func publish(_ value: consuming Value, ticket: Int) -> Bool {
        let slot = ticket % window
        self.value(slot).initialize(to: value)
        stamp(slot).pointee.store(ticket, ordering: .sequentiallyConsistent)
        return counters[Self.consumerWaitsForIndex].pointee.load(ordering: .sequentiallyConsistent) == ticket
    }

    /// Takes the result with ticket `ticket` if it has been published (`nil` if not; a
    /// `Value` that is itself optional comes wrapped).
    @inlinable
    func take(_ ticket: Int) -> Value? {
        let slot = ticket % window
        let stamp = stamp(slot)
        guard stamp.pointee.load(ordering: .acquiring) == ticket else { return nil }
        let value = value(slot).move()
        stamp.pointee.store(-1, ordering: .relaxed)
        return value
    }

    /// Whether the result with ticket `ticket` has been published (for the consumer's
    /// re-check before it parks).
    @inlinable
    func isPublished(_ ticket: Int) -> Bool {
        stamp(ticket % window).pointee.load(ordering: .sequentiallyConsistent) == ticket
    }

    /// Draws the next completion-order ticket. Acquiring and releasing: the worker that
    /// draws ticket `t` may not be the one whose element's pull made slot `t % window` free;
    /// each draw continues the release sequence of the draws before it, so the write that
    /// follows is ordered after the consumer's move-out of ticket `t - window`, whoever
    /// pulled and drew in between. (Relaxed here was a data race ThreadSanitizer reported.)
    @inlinable
    func nextTicket() -> Int {
        counters[Self.ticketsIndex].pointee.wrappingAdd(1, ordering: .acquiringAndReleasing).oldValue
    }

    @inlinable var delivered: Int { counters[Self.deliveredIndex].pointee.load(ordering: .acquiring) }

    // The counters, by name (a pointer: an `Atomic` cannot be copied into a local).
    @inlinable var deliveredCounter: UnsafeMutablePointer<Atomic<Int>> { counters[Self.deliveredIndex] }
    @inlinable var consumerWaitsFor: UnsafeMutablePointer<Atomic<Int>> { counters[Self.consumerWaitsForIndex] }
    @inlinable var feederWaitsFlag: UnsafeMutablePointer<Atomic<Int>> { counters[Self.feederWaitsIndex] }
    @inlinable var overFlag: UnsafeMutablePointer<Atomic<Int>> { counters[Self.overIndex] }
    @inlinable var soloFed: UnsafeMutablePointer<Atomic<Int>> { counters[Self.soloFedIndex] }

    @inlinable var isOver: Bool { counters[Self.overIndex].pointee.load(ordering: .relaxed) != 0 }
}
