@testable import Corral
import CorralTesting
import Synchronization
import Testing

// The Batcher's lock-free intake: a submitter claims a slot in the open batch's buffer with
// one atomic increment, writes its item and stamps the slot; the lock only opens, seals and
// withdraws. The white-box tests below drive `BatcherState` and `BatchBuffer` by hand, one
// step at a time, in the interleavings that matter (a preempted submitter is a claim whose
// next step simply has not been taken yet); the stress tests run the real thing.

// MARK: - Helpers

/// Runs `body` in a task of its own and waits at most `timeout` for it: a hang shows as a
/// recorded issue (and a nil result), not as a test process that never ends. (The sleep
/// only bounds the wait; nothing is synchronised by it.)
func finishes<T: Sendable>(
    within timeout: Duration,
    _ what: String,
    sourceLocation: SourceLocation = #_sourceLocation,
    _ body: @escaping @Sendable () async throws -> T
) async throws -> T? {
    let (results, sink) = AsyncStream<Result<T, any Error>?>.makeStream()
    let work = Task {
        do { sink.yield(.success(try await body())) } catch { sink.yield(.failure(error)) }
    }
    let watchdog = Task {
        try? await Task.sleep(for: timeout)
        if !Task.isCancelled { sink.yield(nil) }
    }
    var iterator = results.makeAsyncIterator()
    let first = await iterator.next() ?? nil
    watchdog.cancel()
    guard let first else {
        work.cancel()
        Issue.record("hung: \(what) did not finish within \(timeout)", sourceLocation: sourceLocation)
        return nil
    }
    return try first.get()
}

/// Counts live `Tracked` items: every item a batcher accepted must be released exactly once.
final class LiveCount: Sendable {
    let count = Atomic<Int>(0)
    var current: Int { count.load(ordering: .acquiring) }
}

final class Tracked: Sendable {
    let value: Int
    let live: LiveCount

    init(_ value: Int, _ live: LiveCount) {
        self.value = value
        self.live = live
        live.count.add(1, ordering: .relaxed)
    }

    deinit {
        live.count.subtract(1, ordering: .releasing)
    }
}

/// A batcher's state behind its lock, driven by hand: no run(), no tasks, no clock. Each
/// method is one step a submitter, the supervisor or a handler's task takes.
final class IntakeMachine<Item: Sendable>: @unchecked Sendable {
    typealias State = BatcherState<Item, Int, ContinuousClock>
    typealias Buffer = BatchBuffer<Item, Int>

    let current = PaddedAtomics(count: 1)
    let state: LockedState<State>
    let output: (Item) -> Int

    init(maxSize: Int, output: @escaping (Item) -> Int) {
        state = LockedState(State(
            maxSize: maxSize, maxDelay: .seconds(3600), maxConcurrentBatches: 1,
            clock: ContinuousClock(), current: current
        ))
        self.output = output
    }

    deinit {
        current.deallocate()
    }

    /// The buffer a submitter's fast path would load now (nil: no batch open).
    var published: Buffer? {
        let bits = current[0].pointee.load(ordering: .acquiring)
        guard bits != 0 else { return nil }
        return Unmanaged<Buffer>.fromOpaque(UnsafeRawPointer(bitPattern: bits)!).takeUnretainedValue()
    }

    var open: Buffer? { state.withLock { $0.open } }
    var stats: BatcherStats { state.withLock { $0.snapshot } }

    /// A claim through the lock (`placeThroughTheLock` before its write); nil when refused.
    func lockedClaim() -> (buffer: Buffer, slot: Int)? {
        switch state.withLock({ $0.enqueue() }) {
        case .claimed(let buffer, let slot, let wake):
            wake.resume()
            return (buffer, slot)
        case .refused:
            return nil
        }
    }

    func filled(_ buffer: Buffer, generation: Int) {
        state.withLock { $0.filled(buffer, generation: generation) }.resume()
    }

    func withdraw(_ buffer: Buffer, generation: Int, slot: Int) {
        state.withLock { $0.withdraw(buffer, generation: generation, slot: slot) }.resume()
    }

    /// The next sealed batch, as the supervisor would hand it to a handler's task. (Taken
    /// from `sealed` directly: these tests are about the intake, not the supervisor.)
    func dispatch() -> State.SealedBatch? {
        state.withLock { $0.sealed.popFirst() }
    }

    /// What the end of a handler call counts.
    func finished(items: Int, failed: Bool) {
        state.withLock { state in
            if failed { state.stats.failed += items } else { state.stats.handled += items }
        }
    }

    /// What `Batcher.handle` does, with a handler that maps `output`; returns the items the
    /// handler was given (nil: the claimed slots are not all written yet, nothing done).
    func handle(_ batch: State.SealedBatch) -> [Item]? {
        guard let taken = batch.buffer.takeItemsIfWritten(count: batch.count) else { return nil }
        let withdrawn = state.withLock { $0.collected(batch.buffer, count: batch.count) }
        let (items, slotToOutput) = State.removing(withdrawn, from: taken)
        batch.outcome.complete(.success(items.map(output)), slotToOutput: slotToOutput)
        finished(items: items.count, failed: false)
        return items
    }

    /// Shuts down and handles every sealed batch; returns the items handed to the handler.
    func drain() -> [[Item]] {
        state.withLock { $0.shutdown() }.resume()
        var handled: [[Item]] = []
        while let batch = dispatch() {
            guard let items = handle(batch) else {
                Issue.record("drain: a claimed slot of a sealed batch is not written")
                return handled
            }
            handled.append(items)
        }
        return handled
    }
}

/// Outcome of one caller in the stress tests.
enum CallerEnd: Sendable {
    case value(Int)
    /// Its batch's handler threw `TestError`.
    case batchError
    case cancelled
    case refused
    case unexpected(String)
}

/// Adds `item` (through `enqueue` and its ticket, or through `submit`) to a batcher whose
/// handler doubles its items, and says how the caller ended; a refusal (`.shutdown`) counts
/// as `.refused` only if `refusalExpected()` when it comes.
func callerEnd(
    of item: Int, viaTicket: Bool, in batcher: Batcher<Int, Int, some Clock>,
    refusalExpected: () -> Bool = { true }
) async -> CallerEnd {
    do {
        let value = viaTicket ? try await batcher.enqueue(item).value : try await batcher.submit(item)
        return value == item * 2 ? .value(value) : .unexpected("got \(value)")
    } catch let error as BatcherError where error.code == .shutdown {
        return refusalExpected() ? .refused : .unexpected("refused before the end")
    } catch is CancellationError {
        return .cancelled
    } catch is TestError {
        return .batchError
    } catch {
        return .unexpected("\(error)")
    }
}

@Suite("Batcher intake")
struct BatcherIntakeTests {
    // MARK: - Fillers, stale claims, recycling

    /// A filler claims the last slot and writes it, then is preempted before it seals. The
    /// next submitter seals the batch, which is handled and its buffer reopened for a later
    /// batch. The filler's seal, arriving now, must not seal that later batch.
    @Test func aFillersLateSeal_afterItsBufferWasReopened_leavesTheNewBatchOpen() async throws {
        let machine = IntakeMachine<Int>(maxSize: 2) { $0 * 2 }
        let (buffer, slot0) = try #require(machine.lockedClaim())
        let (first, generation1) = buffer.write(10, at: slot0)
        // The filler: fast path, last slot, written, then preempted before `filled`.
        let fillerBuffer = try #require(machine.published)
        #expect(fillerBuffer === buffer)
        let fillerSlot = try #require(fillerBuffer.claim())
        #expect(fillerSlot == 1)
        _ = fillerBuffer.write(11, at: fillerSlot)
        // The next submitter finds it full and seals it through the lock; a second batch opens.
        #expect(buffer.claim() == nil)
        let (second, _) = try #require(machine.lockedClaim())
        #expect(second !== buffer)
        _ = second.write(20, at: 0)
        let batch1 = try #require(machine.dispatch())
        #expect(batch1.buffer === buffer && batch1.count == 2)
        #expect(machine.handle(batch1) == [10, 11])
        #expect(try await first.value(slot: 0) {} == 20)
        // The second batch is sealed (as its delay would); the third reuses the first buffer.
        machine.state.withLock { $0.seal(.delay) }
        let (third, slot) = try #require(machine.lockedClaim())
        #expect(third === buffer && slot == 0)
        let (thirdOutcome, generation3) = third.write(30, at: 0)
        #expect(generation3 != generation1)
        // The filler's seal arrives.
        machine.filled(fillerBuffer, generation: generation1)
        #expect(machine.open === buffer, "the filler's late seal sealed a batch it is not in")
        #expect(machine.stats.flushedBySize == 1)
        // The reopened batch still takes items.
        let late = try #require(buffer.claim())
        #expect(late == 1)
        let (lateOutcome, lateGeneration) = buffer.write(31, at: late)
        #expect(lateOutcome === thirdOutcome && lateGeneration == generation3)
        machine.filled(buffer, generation: lateGeneration)
        #expect(machine.open == nil)
        let handled = machine.drain()
        #expect(handled == [[20], [30, 31]])
        #expect(try await thirdOutcome.value(slot: 1) {} == 62)
        let stats = machine.stats
        #expect(stats.submitted == 5 && stats.handled == 5 && stats.buffered == 0, "\(stats)")
    }

    /// A submitter loads the current buffer, then is preempted before its claim. Its claim
    /// must fail while that buffer is sealed or spare, and land in the reopened batch (with
    /// that batch's outcome and generation) once it is the open one again.
    @Test func aStaleClaim_failsOnASealedOrSpareBuffer_andLandsInTheReopenedBatch() async throws {
        let machine = IntakeMachine<Int>(maxSize: 4) { $0 * 2 }
        let (buffer, _) = try #require(machine.lockedClaim())
        _ = buffer.write(1, at: 0)
        let stale = try #require(machine.published)
        machine.state.withLock { $0.seal(.delay) }
        #expect(machine.published == nil)
        #expect(stale.claim() == nil, "a claim succeeded on a sealed buffer")
        let batch = try #require(machine.dispatch())
        #expect(batch.count == 1, "a failed claim was counted in the batch")
        #expect(machine.handle(batch) == [1])
        #expect(stale.claim() == nil, "a claim succeeded on a spare buffer")
        let (reopened, slot) = try #require(machine.lockedClaim())
        #expect(reopened === stale && slot == 0)
        let (outcome, generation) = reopened.write(2, at: 0)
        // The stale submitter resumes now: slot 1 of the open batch.
        let staleSlot = try #require(stale.claim())
        #expect(staleSlot == 1)
        let (staleOutcome, staleGeneration) = stale.write(3, at: staleSlot)
        #expect(staleOutcome === outcome && staleGeneration == generation)
        #expect(machine.stats.submitted == 3)
        #expect(machine.drain() == [[2, 3]])
        #expect(try await staleOutcome.value(slot: staleSlot) {} == 6)
    }

    /// maxSize 1: the opener's slot is the last one. Preempted between its claim (under the
    /// lock) and its write, another submitter finds the batch full and seals it; the handler's
    /// task must wait for the write, and the opener's seal must then do nothing.
    @Test func maxSizeOne_openerPreemptedBeforeItsWrite() async throws {
        let machine = IntakeMachine<Int>(maxSize: 1) { $0 * 2 }
        let (buffer, slot) = try #require(machine.lockedClaim())
        #expect(slot == 0)
        // Another submitter: the fast path fails (full), the lock seals and opens anew.
        #expect(machine.published?.claim() == nil)
        let (second, secondSlot) = try #require(machine.lockedClaim())
        #expect(second !== buffer && secondSlot == 0)
        let (secondOutcome, secondGeneration) = second.write(2, at: 0)
        let batch = try #require(machine.dispatch())
        #expect(batch.buffer === buffer && batch.count == 1)
        #expect(batch.buffer.takeItemsIfWritten(count: batch.count) == nil, "collected an unwritten slot")
        // The opener resumes.
        let (outcome, generation) = buffer.write(1, at: slot)
        machine.filled(buffer, generation: generation)
        #expect(machine.open === second, "the opener's seal sealed another batch")
        #expect(machine.handle(batch) == [1])
        #expect(try await outcome.value(slot: 0) {} == 2)
        machine.filled(second, generation: secondGeneration)
        #expect(machine.drain() == [[2]])
        #expect(try await secondOutcome.value(slot: 0) {} == 4)
        let stats = machine.stats
        #expect(stats.flushedBySize == 2 && stats.submitted == 2 && stats.handled == 2, "\(stats)")
    }

    /// Shutdown seals the open batch between a submitter's claim and its write: the item is in
    /// the batch (the handler's task waits for it), and every later claim is refused.
    @Test func shutdown_betweenAClaimAndItsWrite_keepsTheItem_andRefusesLaterClaims() async throws {
        let machine = IntakeMachine<Int>(maxSize: 4) { $0 * 2 }
        let (buffer, _) = try #require(machine.lockedClaim())
        _ = buffer.write(1, at: 0)
        let slot = try #require(machine.published?.claim())
        let stale = try #require(machine.published)
        machine.state.withLock { $0.shutdown() }.resume()
        #expect(stale.claim() == nil)
        #expect(machine.lockedClaim() == nil, "a claim was accepted after shutdown")
        let batch = try #require(machine.dispatch())
        #expect(batch.count == 2)
        #expect(machine.handle(batch) == nil, "collected before the claimed slot was written")
        let (outcome, _) = buffer.write(5, at: slot)
        #expect(machine.handle(batch) == [1, 5])
        #expect(try await outcome.value(slot: slot) {} == 10)
        #expect(machine.dispatch() == nil)
        let stats = machine.stats
        #expect(stats.submitted == 2 && stats.handled == 2 && stats.flushedByShutdown == 1, "\(stats)")
    }

    // MARK: - Withdrawal

    /// A withdrawal that comes after the handler's task took the items but before it marked
    /// the batch collected is honoured (the item is dropped from the handler's call); one
    /// after is not (the item is handled); one for an earlier generation of a reopened
    /// buffer does nothing to the new batch.
    @Test func withdrawal_racingCollection() async throws {
        let machine = IntakeMachine<Int>(maxSize: 4) { $0 * 2 }
        let (buffer, _) = try #require(machine.lockedClaim())
        let (outcome, generation) = buffer.write(0, at: 0)
        for item in 1...2 { _ = buffer.write(item, at: try #require(buffer.claim())) }
        machine.state.withLock { $0.seal(.delay) }
        let batch = try #require(machine.dispatch())
        let items = try #require(batch.buffer.takeItemsIfWritten(count: batch.count))
        #expect(items == [0, 1, 2])
        machine.withdraw(buffer, generation: generation, slot: 1)  // before `collected`
        let withdrawn = machine.state.withLock { $0.collected(batch.buffer, count: batch.count) }
        #expect(withdrawn == [1])
        machine.withdraw(buffer, generation: generation, slot: 2)  // after: too late
        #expect(machine.stats.withdrawn == 1)
        batch.outcome.complete(.success([0, 4]), slotToOutput: [0, -1, 1])
        machine.finished(items: 2, failed: false)
        await #expect(throws: CancellationError.self) { try await outcome.value(slot: 1) {} }
        #expect(try await outcome.value(slot: 2) {} == 4)
        // The buffer reopens: an old-generation withdrawal must not touch the new batch.
        let (reopened, _) = try #require(machine.lockedClaim())
        #expect(reopened === buffer)
        let (newOutcome, _) = reopened.write(7, at: 0)
        machine.withdraw(buffer, generation: generation, slot: 0)
        #expect(machine.stats.withdrawn == 1)
        #expect(machine.drain() == [[7]])
        #expect(try await newOutcome.value(slot: 0) {} == 14)
        let stats = machine.stats
        #expect(stats.submitted == stats.handled + stats.failed + stats.withdrawn, "\(stats)")
    }

    /// Every written item of the open batch withdrawn while another claim is still being
    /// written: the batch is not "empty" and must not be sealed as such; the late item is
    /// handled.
    @Test func everyWrittenItemWithdrawn_whileAClaimIsInFlight_keepsTheBatchOpen() async throws {
        let machine = IntakeMachine<Int>(maxSize: 4) { $0 * 2 }
        let (buffer, _) = try #require(machine.lockedClaim())
        let (_, generation) = buffer.write(1, at: 0)
        let inFlight = try #require(buffer.claim())
        machine.withdraw(buffer, generation: generation, slot: 0)
        #expect(machine.open === buffer)
        let (outcome, _) = buffer.write(2, at: inFlight)
        #expect(machine.drain() == [[2]])
        #expect(try await outcome.value(slot: inFlight) {} == 4)
        let stats = machine.stats
        #expect(stats.submitted == 2 && stats.withdrawn == 1 && stats.handled == 1, "\(stats)")
    }

    /// A cancelled caller's handler withdraws its item (batcher lock), then removes its waiter
    /// (the batch's lock). If its batch is handled between the two and the handler *throws*,
    /// the caller — whose item was not in that call — must get cancellation, not the batch's
    /// error (as `completionBetweenWithdrawalAndWaiterRemoval_cancelsTheCaller` checks for a
    /// batch that succeeds). White-box: drives that order.
    @Test func aWithdrawnCaller_ofABatchThatFails_getsCancellation_notTheBatchsError() async throws {
        let machine = IntakeMachine<Int>(maxSize: 4) { $0 * 2 }
        let (buffer, slot) = try #require(machine.lockedClaim())
        let (outcome, generation) = buffer.write(1, at: slot)
        let other = try #require(buffer.claim())
        _ = buffer.write(2, at: other)
        let caller = Task {
            try await outcome.value(slot: slot) {
                machine.withdraw(buffer, generation: generation, slot: slot)
                // What the timer, the supervisor and a handler's task may do on other threads now:
                machine.state.withLock { $0.seal(.delay) }
                guard let batch = machine.dispatch(),
                      var items = batch.buffer.takeItemsIfWritten(count: batch.count) else {
                    Issue.record("the batch was not dispatched")
                    return
                }
                let withdrawn = machine.state.withLock { $0.collected(batch.buffer, count: batch.count) }
                #expect(withdrawn == [slot])
                items.remove(at: slot)
                #expect(items == [2])
                // The handler throws for the one item it was given.
                batch.outcome.complete(.failure(TestError(id: 9)), slotToOutput: [-1, 0])
                machine.finished(items: 1, failed: true)
            }
        }
        await waitUntil("the caller waits") { outcome.state.withLock { $0.waiters.count } == 1 }
        caller.cancel()
        await #expect(throws: CancellationError.self) { try await caller.value }
        let stats = machine.stats
        #expect(stats.withdrawn == 1 && stats.failed == 1 && stats.submitted == 2, "\(stats)")
        // The other caller of that batch does get its error.
        await #expect(throws: TestError(id: 9)) { try await outcome.value(slot: other) {} }
    }

    // MARK: - Storage and release

    /// More batches collected than `spareStorageLimit` buffers keep storage for: the rest free
    /// theirs and allocate it again when reopened. Every item reaches the handler once, with
    /// the right value, and is released.
    @Test func spareStorage_freedBeyondTheLimit_isReallocatedOnReopen() async throws {
        let live = LiveCount()
        do {
            let machine = IntakeMachine<Tracked>(maxSize: 3) { $0.value * 2 }
            let limit = BatcherState<Tracked, Int, ContinuousClock>.spareStorageLimit
            for round in 0..<3 {
                // limit + 3 batches sealed at once (each by a full claim), then all collected.
                var expected: [[Int]] = []
                var outcomes: [(BatchOutcome<Int>, Int, Int)] = []
                for batch in 0..<(limit + 3) {
                    var values: [Int] = []
                    for index in 0..<3 {
                        let value = round * 1000 + batch * 10 + index
                        let (buffer, slot): (BatchBuffer<Tracked, Int>, Int)
                        if let open = machine.published, let claimed = open.claim() {
                            (buffer, slot) = (open, claimed)
                        } else {
                            (buffer, slot) = try #require(machine.lockedClaim())
                        }
                        let (outcome, generation) = buffer.write(Tracked(value, live), at: slot)
                        if slot == 2 { machine.filled(buffer, generation: generation) }
                        outcomes.append((outcome, slot, value))
                        values.append(value)
                    }
                    expected.append(values)
                }
                var handled: [[Int]] = []
                while let batch = machine.dispatch() {
                    handled.append(try #require(machine.handle(batch)).map(\.value))
                }
                #expect(handled == expected)
                for (outcome, slot, value) in outcomes {
                    #expect(try await outcome.value(slot: slot) {} == value * 2)
                }
                let withStorage = machine.state.withLock { $0.spare.filter { $0.storage != nil }.count }
                #expect(withStorage == limit)
            }
            #expect(machine.drain().isEmpty)
            #expect(machine.state.withLock { $0.buffers.count } == limit + 3)
        }
        #expect(live.current == 0, "items leaked or released twice: \(live.current)")
    }

    /// A batcher released without running, with sealed batches (more than keep their storage)
    /// and an open one: every ticket fails with `.shutdown`, and every item is released.
    @Test func releasedWithSealedAndOpenBatches_failsEveryTicket_andReleasesEveryItem() async throws {
        let live = LiveCount()
        var tickets: [BatchTicket<Int>] = []
        do {
            let batcher = Batcher<Tracked, Int, ContinuousClock>(maxSize: 2, maxDelay: .seconds(3600)) { items in
                items.map { $0.value }
            }
            for value in 0..<13 { tickets.append(try batcher.enqueue(Tracked(value, live))) }
            #expect(batcher.stats.buffered == 13)
        }
        for ticket in tickets {
            await #expect(throws: BatcherError.shutdown(batcher: "batcher")) {
                try await withTimeout(.seconds(10)) { try await ticket.value }
            }
        }
        #expect(live.current == 0, "items leaked: \(live.current)")
    }

    // MARK: - Stress

    /// Many callers submit and enqueue at once (claims without the lock racing the lock's
    /// seals and reopenings), some cancelled at random, with shutdown in the middle: every
    /// caller ends — with its own item's output, `.shutdown`, or cancellation — and the
    /// counts add up once run() has returned.
    @Test func stress_concurrentIntake_withCancellationsAndShutdown() async throws {
        let rounds = stressIterations(default: 700)
        for round in 0..<rounds {
            var random = SplitMix64(seed: UInt64(round) &* 7919 &+ 17)
            let maxSize = Int.random(in: 1...8, using: &random)
            let maxConcurrent = Int.random(in: 1...3, using: &random)
            let delay: Duration = Bool.random(using: &random) ? .zero : .microseconds(Int64.random(in: 1...1000, using: &random))
            let callers = Int.random(in: 20...400, using: &random)
            // Shutdown while callers are still being started (or, past the end, after all started).
            let shutdownAt = Int.random(in: (callers / 3)...(callers + callers / 4), using: &random)
            let cancelEvery = Int.random(in: 3...11, using: &random)
            let seeds = (0..<callers).map { _ in random.next() }
            let context = "round \(round): maxSize \(maxSize), maxConcurrent \(maxConcurrent), delay \(delay), callers \(callers), shutdownAt \(shutdownAt)"

            let handledItems = Log<[Int]>()
            let batcher = Batcher<Int, Int, ContinuousClock>(
                maxSize: maxSize, maxDelay: delay, maxConcurrentBatches: maxConcurrent
            ) { items in
                handledItems.append(items)
                if items.count % 2 == 0 { await Task.yield() }
                return items.map { $0 * 2 }
            }
            let ends = try await finishes(within: .seconds(60), context) { () async throws -> [(Int, Bool, CallerEnd)] in
                try await withThrowingTaskGroup(of: Void.self) { group in
                    group.addTask { try await batcher.run() }
                    var tasks: [(item: Int, cancelled: Bool, task: Task<CallerEnd, Never>)] = []
                    var shutter: Task<Void, Never>?
                    for item in 0..<callers {
                        if item == shutdownAt { shutter = Task { batcher.shutdown() } }
                        let seed = seeds[item]
                        let viaTicket = seed % 3 == 0
                        let yields = Int((seed >> 8) % 3)
                        let task = Task { () -> CallerEnd in
                            for _ in 0..<yields { await Task.yield() }
                            return await callerEnd(of: item, viaTicket: viaTicket, in: batcher)
                        }
                        let cancelled = Int(seed >> 16) % cancelEvery == 0
                        if cancelled && (seed >> 24) % 2 == 0 { task.cancel() }  // at once
                        tasks.append((item, cancelled, task))
                    }
                    // The others to be cancelled: later, spread out, while their batches may be
                    // open, sealed and waiting, in the handler or done.
                    let late = tasks.filter(\.cancelled).map(\.task)
                    let lateYields = late.indices.map { Int(seeds[$0 % seeds.count] >> 40) % 4 }
                    let canceller = Task {
                        for (task, yields) in zip(late, lateYields) {
                            for _ in 0..<yields { await Task.yield() }
                            task.cancel()
                        }
                    }
                    await canceller.value
                    var ends: [(Int, Bool, CallerEnd)] = []
                    for entry in tasks { ends.append((entry.item, entry.cancelled, await entry.task.value)) }
                    await shutter?.value
                    batcher.shutdown()
                    try await group.waitForAll()
                    return ends
                }
            }
            guard let ends else { return }  // hung: recorded

            let stats = batcher.stats
            #expect(stats.submitted == stats.handled + stats.failed + stats.withdrawn, "\(context): \(stats)")
            #expect(stats.failed == 0 && stats.buffered == 0 && stats.inFlightBatches == 0, "\(context): \(stats)")
            let batches = handledItems.elements
            let handed = batches.flatMap { $0 }
            #expect(batches.allSatisfy { !$0.isEmpty && $0.count <= maxSize }, "\(context): batch sizes \(batches.map(\.count))")
            #expect(Set(handed).count == handed.count, "\(context): an item was handed to the handler twice")
            #expect(handed.count == stats.handled, "\(context): handler got \(handed.count) items, stats \(stats)")
            #expect(stats.batches == batches.count, "\(context): \(stats), \(batches.count) handler calls")
            let handedSet = Set(handed)
            var values = 0, cancelledEnds = 0
            for (item, cancelled, end) in ends {
                switch end {
                case .value:
                    values += 1
                    #expect(handedSet.contains(item), "\(context): caller \(item) got a value its item was not handled for")
                case .refused:
                    break
                case .cancelled:
                    cancelledEnds += 1
                    #expect(cancelled, "\(context): caller \(item) got cancellation without being cancelled")
                case .batchError:
                    Issue.record("\(context): caller \(item): its batch failed, and no handler here throws")
                case .unexpected(let what):
                    Issue.record("\(context): caller \(item): \(what)")
                }
            }
            // Every accepted item is handled or withdrawn; only cancelled callers lose theirs.
            #expect(stats.submitted >= values && stats.submitted - values <= cancelledEnds, "\(context): \(stats), \(values) values, \(cancelledEnds) cancelled")
            #expect(stats.withdrawn <= cancelledEnds, "\(context): \(stats)")
            #expect(stats.submitted <= callers)
        }
    }

    /// Enqueuers racing on a batcher that never runs (claims without the lock racing the
    /// seals of full batches), then released: every ticket fails with `.shutdown` and every
    /// item is released — the release finds every claimed slot written.
    @Test func stress_concurrentEnqueue_thenReleaseWithoutRunning() async throws {
        let rounds = stressIterations(default: 200)
        for round in 0..<rounds {
            var random = SplitMix64(seed: UInt64(round) &+ 1000)
            let maxSize = Int.random(in: 1...8, using: &random)
            let producers = Int.random(in: 2...6, using: &random)
            let perProducer = Int.random(in: 1...60, using: &random)
            let live = LiveCount()
            let ok = try await finishes(within: .seconds(60), "round \(round)") { () async throws -> Bool in
                var tickets: [BatchTicket<Int>] = []
                do {
                    let batcher = Batcher<Tracked, Int, ContinuousClock>(maxSize: maxSize, maxDelay: .seconds(3600)) { items in
                        items.map(\.value)
                    }
                    tickets = try await withThrowingTaskGroup(of: [BatchTicket<Int>].self) { group in
                        for producer in 0..<producers {
                            group.addTask {
                                try (0..<perProducer).map { try batcher.enqueue(Tracked(producer * 1000 + $0, live)) }
                            }
                        }
                        return try await group.reduce(into: []) { $0 += $1 }
                    }
                    let stats = batcher.stats
                    #expect(stats.submitted == producers * perProducer && stats.buffered == stats.submitted, "round \(round): \(stats)")
                }
                for ticket in tickets {
                    await #expect(throws: BatcherError.shutdown(batcher: "batcher")) { try await ticket.value }
                }
                return true
            }
            #expect(ok == true)
            #expect(live.current == 0, "round \(round): \(live.current) items not released")
        }
    }
}
