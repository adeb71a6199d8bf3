@testable import Corral
import CorralTesting
import Foundation
import Synchronization
import Testing

// The Batcher's handler workers (0d64d41): at most `maxConcurrentBatches` long-lived worker
// tasks take batch after batch; the supervisor in run() starts one when a batch could start
// and none is idle; an idle worker is handed a batch by whoever made it startable
// (`dispatch`); `finishIfDone` ends everything after shutdown. These tests check the
// state machine's invariants (at every lock release, sampled under real schedules), the
// corners of the lifecycle (shutdown before run() or from a handler, run() cancelled while
// workers are busy, idle or being started, the timer asleep), a withdrawal sealing the open
// batch while a claim races it (008eb38), and run random schedules. Every wait that a bug
// could make endless is bounded by `finishes(within:)`.

// MARK: - Helpers

extension BatcherState {
    /// What is wrong with the worker/supervisor/timer state, as the state machine's comment
    /// states it must be whenever the lock is free; nil when all is well.
    var workerInvariantViolation: String? {
        var problems: [String] = []
        let canStart = !sealed.isEmpty || openIsDue
        if running + idleWorkers.count != workers {
            problems.append("running \(running) + idle \(idleWorkers.count) != workers \(workers)")
        }
        if running < 0 || workers < 0 || workers > maxConcurrentBatches || running > maxConcurrentBatches {
            problems.append("running \(running), workers \(workers), most \(maxConcurrentBatches)")
        }
        if stats.peakConcurrentBatches > maxConcurrentBatches {
            problems.append("peak \(stats.peakConcurrentBatches) > most \(maxConcurrentBatches)")
        }
        if !idleWorkers.isEmpty && canStart {
            problems.append("\(idleWorkers.count) worker(s) idle while a batch could start (sealed \(sealed.count), open due \(openIsDue))")
        }
        if supervisor != nil && idleWorkers.isEmpty && workers < maxConcurrentBatches && canStart {
            problems.append("the supervisor is parked while it could start a worker (workers \(workers))")
        }
        if openIsDue && open == nil { problems.append("due, with no batch open") }
        if timer != nil && (isShutDown || isFinished || (open != nil && !openIsDue)) {
            problems.append("the timer is parked with work to do (open \(open != nil), due \(openIsDue), shut down \(isShutDown))")
        }
        if isShutDown && open != nil { problems.append("a batch is open after shutdown") }
        // Each buffer is in one place at a time: open, sealed, with a worker (until collected),
        // or spare.
        let placed = (open.map { [ObjectIdentifier($0)] } ?? []) + sealed.map { ObjectIdentifier($0.buffer) }
            + spare.map { ObjectIdentifier($0) }
        if Set(placed).count != placed.count { problems.append("a buffer is in two places (open, sealed, spare)") }
        if placed.count > buffers.count { problems.append("\(placed.count) buffers placed, \(buffers.count) made") }
        if isShutDown && !isFinished && open == nil && sealed.isEmpty && running == 0 {
            problems.append("shut down with nothing left, but not finished")
        }
        if isFinished && (!idleWorkers.isEmpty || supervisor != nil || running != 0 || !sealed.isEmpty || !isShutDown) {
            problems.append("finished with idle \(idleWorkers.count), supervisor \(supervisor != nil), running \(running), sealed \(sealed.count)")
        }
        return problems.isEmpty ? nil : problems.joined(separator: "; ")
    }

    /// The worker/supervisor/timer state on one line, for a hang's report.
    var workerStateDescription: String {
        "workers \(workers), idle \(idleWorkers.count), running \(running), supervisor parked \(supervisor != nil), "
            + "timer parked \(timer != nil), sealed \(sealed.count), open \(open.map { "\($0.claimed) claimed, \($0.withdrawn.count) withdrawn" } ?? "none"), "
            + "due \(openIsDue), shut down \(isShutDown), finished \(isFinished); \(snapshot)"
    }

    /// What run() must leave behind once it has returned; nil when it does.
    var leftAfterRun: String? {
        let clean = isFinished && workers == 0 && idleWorkers.isEmpty && running == 0 && supervisor == nil
            && timer == nil && sealed.isEmpty && open == nil
        return clean ? nil : "workers \(workers), idle \(idleWorkers.count), running \(running), supervisor \(supervisor != nil), "
            + "timer \(timer != nil), sealed \(sealed.count), open \(open != nil), finished \(isFinished)"
    }
}

extension Batcher {
    var workerInvariantViolation: String? { state.withLock { $0.workerInvariantViolation } }
    var leftAfterRun: String? { state.withLock { $0.leftAfterRun } }
    var idleWorkerCount: Int { state.withLock { $0.idleWorkers.count } }
    var workerCount: Int { state.withLock { $0.workers } }
}

/// Checks a batcher's worker invariants under its lock, again and again (between other
/// tasks' steps), until stopped: a violation at any lock release it samples is recorded.
final class InvariantMonitor: Sendable {
    let violations = Log<String>()
    let checks = Atomic<Int>(0)
    let stopped = Atomic<Bool>(false)

    func watch<C: Clock>(_ batcher: Batcher<Int, Int, C>) -> Task<Void, Never> where C.Duration == Duration {
        Task {
            while !stopped.load(ordering: .acquiring) && violations.count < 4 {
                if let violation = batcher.workerInvariantViolation { violations.append(violation) }
                checks.add(1, ordering: .relaxed)
                await Task.yield()
            }
        }
    }

    /// Stops the watcher and records what it saw.
    func stop(_ watcher: Task<Void, Never>, _ context: String, sourceLocation: SourceLocation = #_sourceLocation) async {
        stopped.store(true, ordering: .releasing)
        await watcher.value
        for violation in violations.elements {
            Issue.record("\(context): invariant broken: \(violation)", sourceLocation: sourceLocation)
        }
    }
}

/// A flag shared between tasks.
final class Flag: Sendable {
    private let value = Atomic<Bool>(false)
    func set() { value.store(true, ordering: .releasing) }
    var isSet: Bool { value.load(ordering: .acquiring) }
}

/// Holds a batcher for a handler that uses its own batcher (set once, after init).
final class BatcherBox<C: Clock>: Sendable where C.Duration == Duration {
    private let value = LockedState<Batcher<Int, Int, C>?>(nil)
    var batcher: Batcher<Int, Int, C> {
        get { value.withLock { $0! } }
        set { value.withLock { $0 = newValue } }
    }
}

private let workerOwner = TaskLedger.Owner(kind: "Batcher", name: "workers")

@Suite("Batcher workers")
struct BatcherWorkerTests {
    // MARK: - Idle workers

    /// Three idle workers; the one caller of the open batch is cancelled: the emptied batch
    /// is sealed and handed to an idle worker at once (no handler call), the worker is idle
    /// again, and the next item opens a fresh batch that the timer sends.
    @Test func aBatchEmptiedByWithdrawal_goesToAnIdleWorker_withoutAHandlerCall() async throws {
        let gate = try await closedGate()
        let recorder = BatchRecorder(gate: gate)
        let clock = ManualClock()
        let ledger = TaskLedger()
        let monitor = InvariantMonitor()
        let batcher = Batcher<Int, Int, ManualClock>(
            maxSize: 2, maxDelay: .seconds(1), maxConcurrentBatches: 3, name: "workers", clock: clock,
            handler: recorder.handle
        )
        let watcher = monitor.watch(batcher)
        let done = try await finishes(within: .seconds(30), "withdrawal with idle workers") { () async throws -> Bool in
            let run = Task { try await TaskLedger.$current.withValue(ledger) { try await batcher.run() } }
            let burst = try (1...6).map { try batcher.enqueue($0) }
            await waitUntil("three handler calls") { recorder.running.current == 3 }
            gate.release()
            for (index, ticket) in burst.enumerated() { #expect(try await ticket.value == (index + 1) * 2) }
            await waitUntil("three idle workers") { batcher.idleWorkerCount == 3 }
            let caller = Task { try await batcher.submit(100) }
            await waitUntil("submitted") { batcher.stats.submitted == 7 }
            caller.cancel()
            await #expect(throws: CancellationError.self) { try await caller.value }
            await waitUntil("the emptied batch was taken and its worker is idle again") {
                batcher.state.withLock { $0.sealed.isEmpty && $0.open == nil && $0.running == 0 && $0.idleWorkers.count == 3 }
            }
            #expect(batcher.stats.batches == 3, "a handler call for the emptied batch: \(batcher.stats)")
            #expect(ledger.liveTasks[workerOwner] == 4, "the timer and three workers: \(ledger.liveTasks)")
            let next = try batcher.enqueue(7)
            await clock.waitForSleepers(count: 1)
            clock.advance(by: .seconds(1))
            #expect(try await next.value == 14)
            batcher.shutdown()
            try await run.value
            return true
        }
        await monitor.stop(watcher, "withdrawal with idle workers")
        expectRanToTheEnd(done, batcher, ledger)
        let stats = batcher.stats
        #expect(stats.submitted == 8 && stats.withdrawn == 1 && stats.handled == 7 && stats.batches == 4, "\(stats)")
    }

    /// maxDelay zero, four workers, one caller at a time: each batch is due as soon as it
    /// opens and must go to an idle worker (a stall hangs here). Also on a manual clock: the
    /// timer's due batch wakes one of three idle workers, round after round.
    @Test func dueBatches_goToIdleWorkers_maxDelayZero_andOnTheTimer() async throws {
        let ledger = TaskLedger()
        let monitor = InvariantMonitor()
        let batcher = Batcher<Int, Int, ContinuousClock>(maxSize: 100, maxDelay: .zero, maxConcurrentBatches: 4, name: "workers") { items in
            await Task.yield()
            return items.map { $0 * 2 }
        }
        let watcher = monitor.watch(batcher)
        let done = try await finishes(within: .seconds(30), "maxDelay zero, one caller at a time") { () async throws -> Bool in
            let run = Task { try await TaskLedger.$current.withValue(ledger) { try await batcher.run() } }
            for item in 0..<300 {
                #expect(try await batcher.submit(item) == item * 2)
                #expect((ledger.liveTasks[workerOwner] ?? 0) <= 5)
            }
            batcher.shutdown()
            try await run.value
            return true
        }
        await monitor.stop(watcher, "maxDelay zero")
        expectRanToTheEnd(done, batcher, ledger)
        #expect(batcher.stats.handled == 300 && batcher.stats.peakConcurrentBatches <= 4)

        let gate = try await closedGate()
        let recorder = BatchRecorder(gate: gate)
        let clock = ManualClock()
        let timed = Batcher<Int, Int, ManualClock>(
            maxSize: 2, maxDelay: .seconds(1), maxConcurrentBatches: 3, name: "workers", clock: clock,
            handler: recorder.handle
        )
        let timedMonitor = InvariantMonitor()
        let timedWatcher = timedMonitor.watch(timed)
        let timedDone = try await finishes(within: .seconds(30), "due batches on the timer") { () async throws -> Bool in
            let run = Task { try await timed.run() }
            let burst = try (1...6).map { try timed.enqueue($0) }
            await waitUntil("three handler calls") { recorder.running.current == 3 }
            gate.release()
            for ticket in burst { _ = try await ticket.value }
            for round in 0..<30 {
                await waitUntil("idle workers") { timed.idleWorkerCount == timed.workerCount }
                let ticket = try timed.enqueue(round)
                await clock.waitForSleepers(count: 1)
                clock.advance(by: .seconds(1))
                #expect(try await ticket.value == round * 2)
            }
            timed.shutdown()
            try await run.value
            return true
        }
        await timedMonitor.stop(timedWatcher, "due batches on the timer")
        #expect(timedDone == true)
        #expect(timed.stats.flushedByDelay == 30 && timed.stats.batches == 33, "\(timed.stats)")
    }

    // MARK: - Withdrawal racing a claim

    /// A withdrawal that leaves the open batch empty closes it with `close(ifClaimed:)` and
    /// then seals it, and `seal` closes it again with `close()`, whose count is read from
    /// `reserved`. A submitter's fast-path claim between the two (it loaded `current` before
    /// the seal cleared it) fails on the closed buffer but still increments `reserved`: the
    /// batch is sealed with a slot nobody claimed, and its worker waits in `takeItems` for
    /// that slot's write for ever (run() never returns; the stress test below hangs that way).
    /// Real code on both sides: `withdraw` under the lock, and a thread that does what a
    /// stale submitter does (load `current`, claim), released at varying moments.
    @Test func aWithdrawalThatSealsTheOpenBatch_racingAFailedClaim_countsOnlyClaimedSlots() async throws {
        let machine = IntakeMachine<Int>(maxSize: 4) { $0 * 2 }
        let go = Atomic<Int>(0), done = Atomic<Int>(0), stop = Atomic<Bool>(false)
        let claims = LockedState<[Int]>([])
        let rounds = stressIterations(default: 100_000)
        let claimer = Thread {
            var round = 1
            var random = SplitMix64(seed: 7)
            while !stop.load(ordering: .acquiring) {
                guard go.load(ordering: .acquiring) == round else { continue }
                for _ in 0..<Int(random.next() % 128) { _ = go.load(ordering: .relaxed) }  // sweep the window
                var claimed: [Int] = []
                if let buffer = machine.published, let slot = buffer.claim() {
                    _ = buffer.write(100, at: slot)
                    claimed.append(slot)
                }
                claims.withLock { $0 = claimed }
                done.store(round, ordering: .releasing)
                round += 1
            }
        }
        claimer.start()
        defer { stop.store(true, ordering: .releasing) }
        var phantoms: [String] = []
        for round in 1...rounds {
            let (buffer, slot) = try #require(machine.lockedClaim())
            let (_, generation) = buffer.write(1, at: slot)
            go.store(round, ordering: .releasing)
            machine.withdraw(buffer, generation: generation, slot: slot)
            while done.load(ordering: .acquiring) != round { await Task.yield() }
            let extra = claims.withLock { $0 }
            if machine.open === buffer { machine.state.withLock { $0.seal(.delay) } }  // the claim came first: still open
            let batch = try #require(machine.dispatch())
            if batch.count != 1 + extra.count {
                phantoms.append("round \(round): sealed with \(batch.count) slots, \(1 + extra.count) claimed")
                break  // its slot is never written: the handler's task would wait for ever
            }
            #expect(machine.handle(batch) != nil)
        }
        #expect(phantoms.isEmpty, "\(phantoms)")
        let stats = machine.stats
        #expect(phantoms.isEmpty == (stats.submitted == stats.handled + stats.withdrawn), "\(stats)")
    }

    // MARK: - Shutdown

    /// Shut down before run(), with 150 full batches sealed and one open: run() hands every
    /// one out, within `maxConcurrentBatches`, and returns.
    @Test(arguments: [1, 2, 64])
    func shutdownBeforeRun_everyBatchIsHandled(maxConcurrent: Int) async throws {
        let ledger = TaskLedger()
        let calls = Gauge()
        let batcher = Batcher<Int, Int, ManualClock>(
            maxSize: 2, maxDelay: .seconds(1), maxConcurrentBatches: maxConcurrent, name: "workers", clock: ManualClock()
        ) { items in
            calls.add(1)
            defer { calls.add(-1) }
            for _ in 0..<(items[0] % 3) { await Task.yield() }
            return items.map { $0 * 2 }
        }
        let tickets = try (0..<301).map { try batcher.enqueue($0) }
        batcher.shutdown()
        #expect(throws: BatcherError.self) { try batcher.enqueue(1000) }
        let done = try await finishes(within: .seconds(30), "run() after shutdown") { () async throws -> Bool in
            try await TaskLedger.$current.withValue(ledger) { try await batcher.run() }
            for (item, ticket) in tickets.enumerated() { #expect(try await ticket.value == item * 2) }
            return true
        }
        expectRanToTheEnd(done, batcher, ledger)
        let stats = batcher.stats
        #expect(stats.batches == 151 && stats.handled == 301 && stats.flushedByShutdown == 1, "\(stats)")
        #expect(stats.peakConcurrentBatches <= maxConcurrent && calls.peak <= maxConcurrent, "\(stats), calls \(calls.peak)")

        // Nothing buffered: run() after shutdown returns at once.
        let empty = Batcher<Int, Int, ManualClock>(maxSize: 2, maxDelay: .seconds(1), maxConcurrentBatches: maxConcurrent, clock: ManualClock()) { $0 }
        empty.shutdown()
        let emptyDone = try await finishes(within: .seconds(30), "run() of an empty batcher after shutdown") { () async throws -> Bool in
            try await empty.run()
            return true
        }
        #expect(emptyDone == true && empty.leftAfterRun == nil)
    }

    /// A handler calls shutdown(): the batches sealed before it, and the open one it seals,
    /// are all handled (with one slot: by the same worker, after this call), and run()
    /// returns once they are.
    @Test(arguments: [1, 3])
    func shutdownFromInsideAHandler_runReturnsOnceEveryBatchIsHandled(maxConcurrent: Int) async throws {
        let box = BatcherBox<ManualClock>()
        let ledger = TaskLedger()
        let monitor = InvariantMonitor()
        box.batcher = Batcher<Int, Int, ManualClock>(
            maxSize: 3, maxDelay: .seconds(1), maxConcurrentBatches: maxConcurrent, name: "workers", clock: ManualClock()
        ) { items in
            if items.contains(0) {
                box.batcher.shutdown()
                #expect(throws: BatcherError.self) { try box.batcher.enqueue(-1) }
            }
            await Task.yield()
            return items.map { $0 * 2 }
        }
        let batcher = box.batcher
        let watcher = monitor.watch(batcher)
        let tickets = try (0..<31).map { try batcher.enqueue($0) }  // ten full batches, one open
        let done = try await finishes(within: .seconds(30), "shutdown from a handler") { () async throws -> Bool in
            try await TaskLedger.$current.withValue(ledger) { try await batcher.run() }
            for (item, ticket) in tickets.enumerated() { #expect(try await ticket.value == item * 2) }
            return true
        }
        await monitor.stop(watcher, "shutdown from a handler")
        expectRanToTheEnd(done, batcher, ledger)
        #expect(batcher.stats.handled == 31 && batcher.stats.batches == 11, "\(batcher.stats)")
    }

    // MARK: - Cancelling run()

    /// run()'s task cancelled while every worker is in a handler held by a gate, with more
    /// batches waiting: run() throws CancellationError once every batch has been handed out
    /// (in cancelled tasks), every ticket ends, and no task is left.
    @Test func cancellingRun_whileWorkersAreBusy() async throws {
        let gate = try await closedGate()
        let recorder = BatchRecorder(gate: gate)
        let ledger = TaskLedger()
        let batcher = Batcher<Int, Int, ManualClock>(
            maxSize: 1, maxDelay: .seconds(1), maxConcurrentBatches: 3, name: "workers", clock: ManualClock(),
            handler: recorder.handle
        )
        let run = Task { try await TaskLedger.$current.withValue(ledger) { try await batcher.run() } }
        let tickets = try (1...10).map { try batcher.enqueue($0) }
        let done = try await finishes(within: .seconds(30), "run() cancelled with busy workers") { () async throws -> Bool in
            await waitUntil("three handler calls") { recorder.running.current == 3 }
            run.cancel()
            gate.release()
            await #expect(throws: CancellationError.self) { try await run.value }
            for (index, ticket) in tickets.enumerated() {
                do {
                    #expect(try await ticket.value == (index + 1) * 2)
                } catch is CancellationError {
                    // The handler's wait on the gate saw the cancellation: its batch failed.
                }
            }
            return true
        }
        expectRanToTheEnd(done, batcher, ledger)
        let stats = batcher.stats
        #expect(stats.submitted == 10 && stats.handled + stats.failed == 10 && stats.peakConcurrentBatches == 3, "\(stats)")
    }

    /// run()'s task cancelled while its three workers are idle (and the timer parked):
    /// run() returns at once and the workers exit.
    @Test func cancellingRun_whileWorkersAreIdle() async throws {
        let gate = try await closedGate()
        let recorder = BatchRecorder(gate: gate)
        let ledger = TaskLedger()
        let batcher = Batcher<Int, Int, ManualClock>(
            maxSize: 1, maxDelay: .seconds(1), maxConcurrentBatches: 3, name: "workers", clock: ManualClock(),
            handler: recorder.handle
        )
        let run = Task { try await TaskLedger.$current.withValue(ledger) { try await batcher.run() } }
        let done = try await finishes(within: .seconds(30), "run() cancelled with idle workers") { () async throws -> Bool in
            let tickets = try (1...3).map { try batcher.enqueue($0) }
            await waitUntil("three handler calls") { recorder.running.current == 3 }
            gate.release()
            for ticket in tickets { _ = try await ticket.value }
            await waitUntil("three idle workers") { batcher.idleWorkerCount == 3 }
            run.cancel()
            await #expect(throws: CancellationError.self) { try await run.value }
            return true
        }
        expectRanToTheEnd(done, batcher, ledger)
    }

    /// run() in a task cancelled before (or as) it starts, with 200 full batches buffered and
    /// 64 slots: the supervisor starts its workers in a cancelled group; every batch is
    /// handled (this handler ignores cancellation) and run() throws CancellationError.
    @Test func cancellingRun_whileWorkersAreBeingStarted() async throws {
        for round in 0..<10 {
            let ledger = TaskLedger()
            let calls = Gauge()
            let batcher = Batcher<Int, Int, ManualClock>(
                maxSize: 1, maxDelay: .seconds(1), maxConcurrentBatches: 64, name: "workers", clock: ManualClock()
            ) { items in
                calls.add(1)
                defer { calls.add(-1) }
                await Task.yield()
                return items.map { $0 * 2 }
            }
            let tickets = try (0..<200).map { try batcher.enqueue($0) }
            let run = Task { try await TaskLedger.$current.withValue(ledger) { try await batcher.run() } }
            if round % 2 == 0 {
                run.cancel()  // before run() starts, most likely
            } else {
                for _ in 0..<round { await Task.yield() }
                run.cancel()  // while it starts its workers, perhaps
            }
            let done = try await finishes(within: .seconds(30), "round \(round): run() cancelled as it starts") { () async throws -> Bool in
                await #expect(throws: CancellationError.self) { try await run.value }
                for (item, ticket) in tickets.enumerated() { #expect(try await ticket.value == item * 2) }
                return true
            }
            expectRanToTheEnd(done, batcher, ledger, "round \(round)")
            #expect(batcher.stats.handled == 200 && calls.peak <= 64 && batcher.stats.peakConcurrentBatches <= 64)
        }
    }

    /// run()'s task cancelled while the timer sleeps on a manual clock that never moves:
    /// the open batch is flushed and run() returns without the clock.
    @Test func cancellingRun_whileTheTimerSleeps() async throws {
        let ledger = TaskLedger()
        let clock = ManualClock()
        let batcher = Batcher<Int, Int, ManualClock>(
            maxSize: 10, maxDelay: .seconds(3600), maxConcurrentBatches: 2, name: "workers", clock: clock
        ) { $0.map { $0 * 2 } }
        let run = Task { try await TaskLedger.$current.withValue(ledger) { try await batcher.run() } }
        let done = try await finishes(within: .seconds(30), "run() cancelled with the timer asleep") { () async throws -> Bool in
            let ticket = try batcher.enqueue(5)
            await clock.waitForSleepers(count: 1)
            run.cancel()
            await #expect(throws: CancellationError.self) { try await run.value }
            #expect(try await ticket.value == 10)
            return true
        }
        expectRanToTheEnd(done, batcher, ledger)
        #expect(clock.sleeperCount == 0)
    }

    // MARK: - Handlers that submit

    /// A handler that waits for an item of its own batcher, with a slot to spare: two slots,
    /// one outer call at a time (its inner batch goes to the other worker, idle or started);
    /// and eight slots with four outer callers at once.
    @Test func handlerSubmittingToItsOwnBatcher_withSlotsToSpare() async throws {
        for (slots, callers) in [(2, 1), (8, 4)] {
            let box = BatcherBox<ContinuousClock>()
            let ledger = TaskLedger()
            let monitor = InvariantMonitor()
            box.batcher = Batcher<Int, Int, ContinuousClock>(
                maxSize: 1, maxDelay: .zero, maxConcurrentBatches: slots, name: "workers"
            ) { items in
                let item = items[0]
                if item >= 1000 { return [try await box.batcher.submit(item - 1000) + 1] }
                await Task.yield()
                return [item * 2]
            }
            let batcher = box.batcher
            let watcher = monitor.watch(batcher)
            let done = try await finishes(within: .seconds(30), "\(slots) slots, \(callers) callers: a handler submitting") { () async throws -> Bool in
                let run = Task { try await TaskLedger.$current.withValue(ledger) { try await batcher.run() } }
                try await withThrowingTaskGroup(of: Void.self) { group in
                    for caller in 0..<callers {
                        group.addTask {
                            for index in 0..<50 {
                                let item = caller * 100 + index
                                let value = try await batcher.submit(1000 + item)
                                #expect(value == item * 2 + 1)
                            }
                        }
                    }
                    try await group.waitForAll()
                }
                batcher.shutdown()
                try await run.value
                return true
            }
            await monitor.stop(watcher, "\(slots) slots: a handler submitting")
            expectRanToTheEnd(done, batcher, ledger)
            #expect(batcher.stats.handled == 100 * callers && batcher.stats.peakConcurrentBatches <= slots, "\(batcher.stats)")
        }
    }

    /// A handler enqueues an item of its own batcher, shuts the batcher down and waits for
    /// that item (two slots): the item's batch, sealed by the shutdown, goes to a second
    /// worker, started for it; run() returns after both.
    @Test func handlerThatEnqueuesThenShutsDown_andWaits() async throws {
        let box = BatcherBox<ManualClock>()
        box.batcher = Batcher<Int, Int, ManualClock>(
            maxSize: 2, maxDelay: .seconds(3600), maxConcurrentBatches: 2, name: "workers", clock: ManualClock()
        ) { items in
            if items == [1, 2] {
                let inner = try box.batcher.enqueue(20)
                box.batcher.shutdown()
                return [try await inner.value, 4]
            }
            return items.map { $0 * 2 }
        }
        let batcher = box.batcher
        let done = try await finishes(within: .seconds(30), "a handler enqueueing, then shutting down") { () async throws -> Bool in
            let outer = try (1...2).map { try batcher.enqueue($0) }
            try await batcher.run()
            #expect(try await outer[0].value == 40)
            #expect(try await outer[1].value == 4)
            return true
        }
        #expect(done == true)
        #expect(batcher.leftAfterRun == nil, "\(batcher.leftAfterRun ?? "")")
        let stats = batcher.stats
        #expect(stats.handled == 3 && stats.batches == 2 && stats.flushedByShutdown == 1, "\(stats)")
    }

    // MARK: - Many slots

    /// 64 slots, 200 single-item batches held by a gate: 64 handler calls, 64 workers (plus
    /// the timer), never more; all are kept between batches and gone after run().
    @Test func sixtyFourSlots_boundWorkersAndCalls() async throws {
        let gate = try await closedGate()
        let recorder = BatchRecorder(gate: gate)
        let ledger = TaskLedger()
        let monitor = InvariantMonitor()
        let batcher = Batcher<Int, Int, ManualClock>(
            maxSize: 1, maxDelay: .seconds(1), maxConcurrentBatches: 64, name: "workers", clock: ManualClock(),
            handler: recorder.handle
        )
        let watcher = monitor.watch(batcher)
        let done = try await finishes(within: .seconds(30), "64 slots") { () async throws -> Bool in
            let run = Task { try await TaskLedger.$current.withValue(ledger) { try await batcher.run() } }
            let tickets = try (1...200).map { try batcher.enqueue($0) }
            await waitUntil("64 handler calls") { recorder.running.current == 64 }
            #expect(ledger.liveTasks[workerOwner] == 65, "\(ledger.liveTasks)")
            #expect(batcher.stats.inFlightBatches == 64 && batcher.stats.buffered == 136, "\(batcher.stats)")
            gate.release()
            for (index, ticket) in tickets.enumerated() { #expect(try await ticket.value == (index + 1) * 2) }
            await waitUntil("64 idle workers") { batcher.idleWorkerCount == 64 }
            #expect(ledger.liveTasks[workerOwner] == 65, "\(ledger.liveTasks)")
            batcher.shutdown()
            try await run.value
            return true
        }
        await monitor.stop(watcher, "64 slots")
        expectRanToTheEnd(done, batcher, ledger)
        #expect(recorder.running.peak == 64 && batcher.stats.peakConcurrentBatches == 64 && batcher.stats.batches == 200)
    }

    // MARK: - Stress

    /// Random schedules aimed at the workers: 1...6 slots, handlers that yield, wait on a
    /// gate opened at a random moment, look at cancellation or throw; callers that submit or
    /// enqueue, some cancelled; run() started early or late (even after shutdown), ended by
    /// shutdown() (from another task, racing the submitters) or by cancelling its task. The
    /// worker invariants are sampled throughout; run() must return, every caller must end
    /// with its own result, its batch's error, cancellation or `.shutdown`, and nothing may
    /// be left: counts, workers, tasks.
    @Test func stress_workers_randomSchedules() async throws {
        let rounds = stressIterations(default: 800)
        for round in 0..<rounds {
            var random = SplitMix64(seed: UInt64(round) &* 0x9E37 &+ 5)
            let maxConcurrent = Int.random(in: 1...6, using: &random)
            let maxSize = Int.random(in: 1...6, using: &random)
            // Zero, short, or long enough that only size, withdrawal and the end seal a batch
            // (its timer then sleeps until run() ends).
            let delay: Duration = switch Int.random(in: 0..<3, using: &random) {
            case 0: .zero
            case 1: .microseconds(Int64.random(in: 1...300, using: &random))
            default: .seconds(10)
            }
            let callers = Int.random(in: 5...150, using: &random)
            let runAt = Int.random(in: 0...(callers + 5), using: &random)
            let endAt = Int.random(in: (callers / 4)...(callers + 5), using: &random)
            let cancelRun = Int.random(in: 0..<3, using: &random) == 0
            let gateYields = Int.random(in: 0...200, using: &random)
            let cancelEvery = Int.random(in: 1...10, using: &random)  // 1: every caller
            let handlerSalt = random.next()
            let seeds = (0..<callers).map { _ in random.next() }
            let context = "round \(round): slots \(maxConcurrent), maxSize \(maxSize), delay \(delay), callers \(callers), "
                + "run at \(runAt), end at \(endAt) by \(cancelRun ? "cancel" : "shutdown")"

            let gate = try await closedGate()
            let calls = Gauge()
            let handed = Log<[Int]>()
            let ended = Flag()  // shutdown or the cancellation of run() was triggered
            let batcher = Batcher<Int, Int, ContinuousClock>(
                maxSize: maxSize, maxDelay: delay, maxConcurrentBatches: maxConcurrent, name: "stress"
            ) { items in
                calls.add(1)
                defer { calls.add(-1) }
                handed.append(items)
                var mix = SplitMix64(seed: handlerSalt ^ UInt64(items[0]))
                switch mix.next() % 5 {
                case 0: break
                case 1: for _ in 0..<Int(mix.next() % 4) { await Task.yield() }
                case 2:
                    try await gate.acquire()
                    gate.release()
                case 3:
                    await Task.yield()
                    try Task.checkCancellation()
                default: await Task.yield()
                }
                if items.contains(where: { $0 % 17 == 16 }) { throw TestError(id: -1) }
                return items.map { $0 * 2 }
            }
            let ledger = TaskLedger()
            let monitor = InvariantMonitor()
            let watcher = monitor.watch(batcher)
            let opener = Task {
                for _ in 0..<gateYields { await Task.yield() }
                gate.release()
            }
            let outcome = try await finishes(within: .seconds(60), context) { () async throws -> [(Int, Bool, CallerEnd)] in
                var run: Task<Void, any Error>?
                func startRun() {
                    run = Task { try await TaskLedger.$current.withValue(ledger) { try await batcher.run() } }
                }
                var ender: Task<Void, Never>?
                func end() {
                    ended.set()
                    if cancelRun {
                        if run == nil { startRun() }
                        run!.cancel()
                    } else {
                        ender = Task { batcher.shutdown() }
                    }
                }
                var tasks: [(item: Int, cancelled: Bool, task: Task<CallerEnd, Never>)] = []
                var cancelLater: [(at: Int, task: Task<CallerEnd, Never>)] = []
                var cancelAtTheEnd: [Task<CallerEnd, Never>] = []
                for item in 0..<callers {
                    if item == runAt && run == nil { startRun() }
                    if item == endAt { end() }
                    let seed = seeds[item]
                    // Spread the callers out: a few yields, and now and then a lull (until
                    // nothing is buffered, or a bounded while) in which the timer seals
                    // batches and the workers go idle.
                    if (seed >> 32) % 16 == 0 && run != nil {
                        var yields = 0
                        while yields < 200 && batcher.stats.buffered > 0 {
                            await Task.yield()
                            yields += 1
                        }
                    } else {
                        for _ in 0..<Int((seed >> 36) % 3) { await Task.yield() }
                    }
                    let viaTicket = seed % 3 == 0
                    let yields = Int((seed >> 8) % 3)
                    let task = Task { () -> CallerEnd in
                        for _ in 0..<yields { await Task.yield() }
                        return await callerEnd(of: item, viaTicket: viaTicket, in: batcher) { ended.isSet }
                    }
                    // Some callers are cancelled: at once (before they submit, mostly), a few
                    // callers later (while their batch may be open, sealed, in the handler or
                    // done), or after every caller has started.
                    let cancelled = Int(seed >> 16) % cancelEvery == 0
                    if cancelled {
                        switch (seed >> 24) % 3 {
                        case 0: task.cancel()
                        case 1: cancelLater.append((item + Int((seed >> 28) % 6), task))
                        default: cancelAtTheEnd.append(task)
                        }
                    }
                    tasks.append((item, cancelled, task))
                    while let first = cancelLater.first, first.at <= item {
                        cancelLater.removeFirst().task.cancel()
                    }
                }
                let late = cancelLater.map(\.task) + cancelAtTheEnd
                let canceller = Task {
                    for (index, task) in late.enumerated() {
                        for _ in 0..<Int(seeds[index] >> 40) % 4 { await Task.yield() }
                        task.cancel()
                    }
                }
                if run == nil { startRun() }
                if !ended.isSet { end() }
                await canceller.value
                await ender?.value
                var ends: [(Int, Bool, CallerEnd)] = []
                for entry in tasks { ends.append((entry.item, entry.cancelled, await entry.task.value)) }
                do {
                    try await run!.value
                    #expect(!cancelRun, "\(context): run() returned without CancellationError")
                } catch is CancellationError {
                    #expect(cancelRun, "\(context): run() threw CancellationError without being cancelled")
                }
                return ends
            }
            await opener.value
            await monitor.stop(watcher, context)
            guard let ends = outcome else {  // hung: recorded
                Issue.record("\(context): hung with \(batcher.state.withLock { $0.workerStateDescription }); handler calls running \(calls.current)")
                return
            }

            #expect(batcher.leftAfterRun == nil, "\(context): \(batcher.leftAfterRun ?? "")")
            await expectLedgerEmpty(ledger, context)
            let stats = batcher.stats
            #expect(stats.submitted == stats.handled + stats.failed + stats.withdrawn, "\(context): \(stats)")
            #expect(stats.buffered == 0 && stats.inFlightBatches == 0, "\(context): \(stats)")
            #expect(stats.peakConcurrentBatches <= maxConcurrent && calls.peak <= maxConcurrent, "\(context): \(stats), calls \(calls.peak)")
            let batches = handed.elements
            let items = batches.flatMap { $0 }
            #expect(Set(items).count == items.count, "\(context): an item was handed to the handler twice")
            #expect(items.count == stats.handled + stats.failed, "\(context): \(items.count) items handed, \(stats)")
            #expect(batches.count == stats.batches && batches.allSatisfy { !$0.isEmpty && $0.count <= maxSize }, "\(context): \(stats)")
            let batchOf = Dictionary(uniqueKeysWithValues: batches.flatMap { batch in batch.map { ($0, batch) } })
            var values = 0, cancelledEnds = 0
            for (item, cancelled, end) in ends {
                switch end {
                case .value:
                    values += 1
                    #expect(batchOf[item] != nil, "\(context): caller \(item) got a value, its item was not handled")
                case .batchError:
                    #expect(batchOf[item]?.contains { $0 % 17 == 16 } == true, "\(context): caller \(item) got another batch's error")
                case .cancelled:
                    cancelledEnds += 1
                    #expect(cancelled || (cancelRun && batchOf[item] != nil), "\(context): caller \(item) cancelled for nothing")
                case .refused:
                    break
                case .unexpected(let what):
                    Issue.record("\(context): caller \(item): \(what)")
                }
            }
            #expect(values <= stats.handled && stats.withdrawn <= cancelledEnds, "\(context): \(stats), \(values) values")
            #expect(stats.submitted <= callers, "\(context): \(stats)")
        }
    }
}

/// A run that `finishes(within:)` watched: it ended in time (`done`), left nothing in the
/// batcher's state, and no task of the test's ledger.
private func expectRanToTheEnd<C: Clock>(
    _ done: Bool?, _ batcher: Batcher<Int, Int, C>, _ ledger: TaskLedger, _ context: String = "",
    sourceLocation: SourceLocation = #_sourceLocation
) {
    #expect(done == true, "\(context)", sourceLocation: sourceLocation)
    #expect(batcher.leftAfterRun == nil, "\(context): \(batcher.leftAfterRun ?? "")", sourceLocation: sourceLocation)
    #expect(ledger.liveTaskCount == 0, "\(context): left behind: \(ledger.liveTasks)", sourceLocation: sourceLocation)
}

/// The leak check of `expectNoLeakedTasks`, on a ledger the test bound itself.
private func expectLedgerEmpty(_ ledger: TaskLedger, _ context: String, sourceLocation: SourceLocation = #_sourceLocation) async {
    for _ in 0..<10_000 where ledger.liveTaskCount > 0 { await Task.yield() }
    #expect(ledger.liveTaskCount == 0, "\(context): left behind: \(ledger.liveTasks)", sourceLocation: sourceLocation)
}
