@testable import Corral
import CorralTesting
import Testing

/// Records every batch the handler is given; can hold the handler on a gate.
final class BatchRecorder: Sendable {
    let batches = Log<[Int]>()
    let running = Gauge()
    let gate: AsyncSemaphore?

    init(gate: AsyncSemaphore? = nil) {
        self.gate = gate
    }

    /// Returns each item doubled; throws `TestError(id: item)` for a negative item.
    func handle(_ items: [Int]) async throws -> [Int] {
        #expect(!items.isEmpty, "the handler was given an empty batch")
        batches.append(items)
        running.add(1)
        defer { running.add(-1) }
        if let gate {
            try await gate.acquire()
            gate.release()
        }
        if let bad = items.first(where: { $0 < 0 }) { throw TestError(id: bad) }
        return items.map { $0 * 2 }
    }
}

/// A batcher on a manual clock running in a task group, shut down and awaited at the end.
func withBatcher<R: Sendable>(
    maxSize: Int,
    maxDelay: Duration = .milliseconds(10),
    maxConcurrentBatches: Int = 1,
    handler: @escaping @Sendable ([Int]) async throws -> [Int],
    _ body: (Batcher<Int, Int, ManualClock>, ManualClock) async throws -> R
) async throws -> R {
    let clock = ManualClock()
    let batcher = Batcher<Int, Int, ManualClock>(
        maxSize: maxSize, maxDelay: maxDelay, maxConcurrentBatches: maxConcurrentBatches,
        name: "test", clock: clock, handler: handler
    )
    return try await withThrowingTaskGroup(of: Void.self) { group in
        group.addTask { try await batcher.run() }
        let result = try await body(batcher, clock)
        batcher.shutdown()
        try await group.waitForAll()
        let stats = batcher.stats
        #expect(stats.submitted == stats.handled + stats.failed + stats.withdrawn, "accounting: \(stats)")
        #expect(stats.buffered == 0 && stats.inFlightBatches == 0)
        return result
    }
}

@Suite("Batcher")
struct BatcherTests {
    @Test func aBatcherReleasedWithoutRunning_failsTheTicketsItHeld() async throws {
        var batcher: Batcher<Int, Int, ContinuousClock>? = Batcher(maxSize: 10, maxDelay: .seconds(60)) { $0 }
        let ticket = try batcher!.enqueue(1)
        batcher = nil
        // (Bounded: without the fix the ticket waited for ever.)
        await #expect(throws: BatcherError.self) { try await withTimeout(.seconds(10)) { try await ticket.value } }
    }

    @Test func fullBatch_isSentAtOnce_andEachCallerGetsItsOwnResult() async throws {
        let recorder = BatchRecorder()
        try await withBatcher(maxSize: 4, handler: recorder.handle) { batcher, _ async throws in
            try await withThrowingTaskGroup(of: (Int, Int).self) { group in
                for item in 1...8 {
                    group.addTask { (item, try await batcher.submit(item)) }
                }
                for try await (item, result) in group {
                    #expect(result == item * 2)
                }
            }
            // No clock advance happened: both batches went out because they were full.
            #expect(recorder.batches.elements.map(\.count) == [4, 4])
            #expect(batcher.stats.flushedBySize == 2 && batcher.stats.flushedByDelay == 0)
        }
    }

    @Test func partialBatch_isSentMaxDelayAfterItsFirstItem() async throws {
        let recorder = BatchRecorder()
        try await withBatcher(maxSize: 100, maxDelay: .milliseconds(10), handler: recorder.handle) { batcher, clock async throws in
            let first = try batcher.enqueue(1)
            await clock.waitForSleepers(count: 1)  // the timer sleeps until t+10ms
            clock.advance(by: .milliseconds(6))
            let second = try batcher.enqueue(2)   // same batch: due at t+10ms, not t+16ms
            clock.advance(by: .milliseconds(3))
            #expect(batcher.stats.batches == 0, "sent before its delay")
            clock.advance(by: .milliseconds(1))
            #expect(try await first.value == 2)
            #expect(try await second.value == 4)
            #expect(recorder.batches.elements == [[1, 2]])

            // The next batch's delay counts from its own first item.
            let third = try batcher.enqueue(3)
            await clock.waitForSleepers(count: 1)
            clock.advance(by: .milliseconds(9))
            #expect(batcher.stats.batches == 1)
            clock.advance(by: .milliseconds(1))
            #expect(try await third.value == 6)
            #expect(batcher.stats.flushedByDelay == 2)
        }
    }

    @Test func idleBatcher_doesNotTick() async throws {
        let recorder = BatchRecorder()
        try await withBatcher(maxSize: 10, handler: recorder.handle) { batcher, clock async throws in
            // With nothing buffered the timer waits for an item, not on the clock.
            await Task.yield()
            #expect(clock.sleeperCount == 0)
            _ = try batcher.enqueue(1)
            await clock.waitForSleepers(count: 1)
            #expect(clock.sleeperCount == 1)
        }
        #expect(recorder.batches.elements == [[1]], "shutdown sends what is buffered")
    }

    @Test func handlerError_failsExactlyThatBatch() async throws {
        let recorder = BatchRecorder()
        try await withBatcher(maxSize: 2, handler: recorder.handle) { batcher, _ async throws in
            let good1 = try batcher.enqueue(1), good2 = try batcher.enqueue(2)
            let bad1 = try batcher.enqueue(-3), bad2 = try batcher.enqueue(4)
            let good3 = try batcher.enqueue(5), good4 = try batcher.enqueue(6)
            #expect(try await good1.value == 2)
            #expect(try await good2.value == 4)
            await #expect(throws: TestError(id: -3)) { try await bad1.value }
            await #expect(throws: TestError(id: -3)) { try await bad2.value }
            #expect(try await good3.value == 10)
            #expect(try await good4.value == 12)
            let stats = batcher.stats
            #expect(stats.failed == 2 && stats.failedBatches == 1 && stats.handled == 4)
        }
    }

    @Test func wrongNumberOfOutputs_failsTheBatchWithAClearError() async throws {
        try await withBatcher(maxSize: 3, handler: { items in Array(items.dropLast()) }) { batcher, _ async throws in
            let tickets = try (1...3).map { try batcher.enqueue($0) }
            for ticket in tickets {
                do {
                    _ = try await ticket.value
                    Issue.record("a mismatched batch delivered a result")
                } catch let error as BatcherError {
                    #expect(error.code == .outputCountMismatch)
                    #expect(error.expectedOutputs == 3 && error.actualOutputs == 2)
                    #expect(error.description.contains("2 outputs for 3 items"))
                }
            }
        }
    }

    @Test func maxConcurrentBatches_boundsHandlerCalls() async throws {
        let gate = try await closedGate()
        let recorder = BatchRecorder(gate: gate)
        try await withBatcher(maxSize: 1, maxConcurrentBatches: 2, handler: recorder.handle) { batcher, _ async throws in
            let tickets = try (1...6).map { try batcher.enqueue($0) }
            await waitUntil("two handler calls running") { recorder.running.current == 2 }
            #expect(batcher.stats.inFlightBatches == 2)
            #expect(batcher.stats.buffered == 4, "the other sealed batches wait for a slot")
            gate.release()
            for (index, ticket) in tickets.enumerated() {
                #expect(try await ticket.value == (index + 1) * 2)
            }
            #expect(recorder.running.peak == 2)
            #expect(batcher.stats.peakConcurrentBatches == 2)
            // Sealed batches are sent in order.
            #expect(recorder.batches.elements.flatMap { $0 }.sorted() == [1, 2, 3, 4, 5, 6])
        }
    }

    /// Handler calls run on at most `maxConcurrentBatches` worker tasks, which take batch after
    /// batch, wait idle when there is none (and are woken for the next), and exit with run().
    @Test func handlerWorkers_areBounded_wokenWhenIdle_andExitWithRun() async throws {
        let ledger = TaskLedger()
        let owner = TaskLedger.Owner(kind: "Batcher", name: "test")
        let gate = try await closedGate()
        let recorder = BatchRecorder(gate: gate)
        let clock = ManualClock()
        let batcher = Batcher<Int, Int, ManualClock>(
            maxSize: 2, maxDelay: .seconds(1), maxConcurrentBatches: 2, name: "test", clock: clock,
            handler: recorder.handle
        )
        let run = Task { try await TaskLedger.$current.withValue(ledger) { try await batcher.run() } }
        // A burst: ten full batches while the handler is held. Two run, eight wait.
        let burst = try (1...20).map { try batcher.enqueue($0) }
        await waitUntil("two handler calls running") { recorder.running.current == 2 }
        #expect(ledger.liveTasks[owner] == 3, "the timer and two workers: \(ledger.liveTasks)")
        gate.release()
        for (index, ticket) in burst.enumerated() { #expect(try await ticket.value == (index + 1) * 2) }
        #expect(ledger.liveTasks[owner] == 3, "workers are kept, not started per batch")
        // Both workers idle now; a batch sealed by its delay wakes one.
        let late = try batcher.enqueue(21)
        await clock.waitForSleepers(count: 1)
        clock.advance(by: .seconds(1))
        #expect(try await late.value == 42)
        #expect(ledger.liveTasks[owner] == 3)
        batcher.shutdown()
        try await run.value
        #expect(ledger.liveTaskCount == 0, "left behind: \(ledger.liveTasks)")
        #expect(batcher.stats.batches == 11 && batcher.stats.peakConcurrentBatches == 2)
    }

    @Test func cancelledCaller_isWithdrawnBeforeItsBatchIsSent() async throws {
        let recorder = BatchRecorder()
        try await withBatcher(maxSize: 10, handler: recorder.handle) { batcher, clock async throws in
            let cancelled = Task { try await batcher.submit(1) }
            let kept = Task { try await batcher.submit(2) }
            await waitUntil("both submitted") { batcher.stats.submitted == 2 }
            cancelled.cancel()
            await #expect(throws: CancellationError.self) { try await cancelled.value }
            #expect(batcher.stats.withdrawn == 1)
            await clock.waitForSleepers(count: 1)
            clock.advance(by: .milliseconds(10))
            #expect(try await kept.value == 4)
            #expect(recorder.batches.elements == [[2]], "the withdrawn item was sent")
        }
    }

    @Test func batchWhoseEveryCallerWasCancelled_isNeverSent() async throws {
        let recorder = BatchRecorder()
        try await withBatcher(maxSize: 10, handler: recorder.handle) { batcher, clock async throws in
            let callers = (1...3).map { item in Task { try await batcher.submit(item) } }
            await waitUntil("all submitted") { batcher.stats.submitted == 3 }
            for caller in callers { caller.cancel() }
            for caller in callers {
                await #expect(throws: CancellationError.self) { try await caller.value }
            }
            await clock.waitForSleepers(count: 1)
            clock.advance(by: .milliseconds(10))
            // The timer found no batch to send; the next item opens a fresh one.
            #expect(try await batcher.submitAfterFlush(4, clock: clock) == 8)
            #expect(recorder.batches.elements == [[4]])
            #expect(batcher.stats.withdrawn == 3)
        }
    }

    @Test func cancelledCaller_whoseBatchWaitsForAHandlerSlot_isWithdrawn() async throws {
        let gate = try await closedGate()
        let recorder = BatchRecorder(gate: gate)
        try await withBatcher(maxSize: 2, handler: recorder.handle) { batcher, _ async throws in
            let first = try (1...2).map { try batcher.enqueue($0) }  // in the handler, held by the gate
            await waitUntil("handler running") { recorder.running.current == 1 }
            let cancelled = Task { try await batcher.submit(3) }
            await waitUntil("submitted") { batcher.stats.submitted == 3 }
            let kept = try batcher.enqueue(4)  // the second batch is full: sealed, waiting for the slot
            #expect(batcher.stats.buffered == 2)
            cancelled.cancel()
            await #expect(throws: CancellationError.self) { try await cancelled.value }
            #expect(batcher.stats.withdrawn == 1 && batcher.stats.buffered == 1)
            gate.release()
            for (index, ticket) in first.enumerated() { #expect(try await ticket.value == (index + 1) * 2) }
            #expect(try await kept.value == 8)
            #expect(recorder.batches.elements == [[1, 2], [4]], "the withdrawn item was sent")
        }
    }

    @Test func cancelledCaller_afterItsBatchWasSent_getsCancellation_andTheBatchCompletes() async throws {
        let gate = try await closedGate()
        let recorder = BatchRecorder(gate: gate)
        try await withBatcher(maxSize: 2, handler: recorder.handle) { batcher, _ async throws in
            let cancelled = Task { try await batcher.submit(1) }
            await waitUntil("submitted") { batcher.stats.submitted == 1 }
            let other = try batcher.enqueue(2)
            await waitUntil("handler running") { recorder.running.current == 1 }
            cancelled.cancel()
            await #expect(throws: CancellationError.self) { try await cancelled.value }
            gate.release()
            #expect(try await other.value == 4)
            #expect(batcher.stats.withdrawn == 0 && batcher.stats.handled == 2)
        }
    }

    @Test func shutdown_sendsWhatIsBuffered_andRefusesNewItems() async throws {
        let recorder = BatchRecorder()
        let clock = ManualClock()
        let batcher = Batcher<Int, Int, ManualClock>(
            maxSize: 100, maxDelay: .seconds(3600), name: "orders", clock: clock, handler: recorder.handle
        )
        let tickets = try (1...3).map { try batcher.enqueue($0) }  // before run(): they wait
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await batcher.run() }
            batcher.shutdown()
            try await group.waitForAll()   // run() returns without the clock moving
        }
        for (index, ticket) in tickets.enumerated() {
            #expect(try await ticket.value == (index + 1) * 2)
        }
        #expect(batcher.stats.flushedByShutdown == 1)
        #expect(throws: BatcherError.shutdown(batcher: "orders")) { try batcher.enqueue(4) }
        await #expect(throws: BatcherError.self) { try await batcher.submit(5) }
        batcher.shutdown()  // idempotent
    }

    @Test func cancellingRun_flushesAndThrowsCancellation() async throws {
        let recorder = BatchRecorder()
        let batcher = Batcher<Int, Int, ManualClock>(
            maxSize: 100, maxDelay: .seconds(1), clock: ManualClock(), handler: recorder.handle
        )
        let run = Task { try await batcher.run() }
        let ticket = try batcher.enqueue(7)
        run.cancel()
        await #expect(throws: CancellationError.self) { try await run.value }
        // The handler ran (in a cancelled task; this one ignores cancellation).
        #expect(try await ticket.value == 14)
        #expect(throws: BatcherError.self) { try batcher.enqueue(8) }
    }

    @Test func tickets_mayBeAwaitedTwice() async throws {
        try await withBatcher(maxSize: 1, handler: { $0.map { $0 + 1 } }) { batcher, _ async throws in
            let ticket = try batcher.enqueue(41)
            #expect(try await ticket.value == 42)
            #expect(try await ticket.value == 42)
        }
    }

    @Test func runLeavesNoTaskBehind() async throws {
        try await expectNoLeakedTasks {
            let gate = try await closedGate()
            let recorder = BatchRecorder(gate: gate)
            try await withBatcher(maxSize: 3, maxConcurrentBatches: 2, handler: recorder.handle) { batcher, _ async throws in
                let tickets = try (1...7).map { try batcher.enqueue($0) }
                await waitUntil("handlers running") { recorder.running.current == 2 }
                gate.release()
                // Item 7's batch is not full: withBatcher's shutdown sends it.
                for ticket in tickets.dropLast() { _ = try await ticket.value }
            }
        }
    }

    /// Callers that come after their batch completed read the result without waiting (and
    /// without the outcome's lock): their own output, the batch's error, or cancellation for
    /// a withdrawn slot.
    @Test func aCompletedBatch_answersLateCallers() async throws {
        let outcome = BatchOutcome<Int>()
        outcome.complete(.success([20, 30]), slotToOutput: [0, -1, 1])
        #expect(try await outcome.value(slot: 0) {} == 20)
        #expect(try await outcome.value(slot: 2) {} == 30)
        await #expect(throws: CancellationError.self) { try await outcome.value(slot: 1) {} }
        let failed = BatchOutcome<Int>()
        failed.complete(.failure(TestFailure(id: 1)), slotToOutput: nil)
        await #expect(throws: TestFailure(id: 1)) { try await failed.value(slot: 0) {} }
    }

    /// A cancelled caller's handler withdraws its item (batcher lock), then removes its waiter
    /// (the batch's lock). If the batch is closed, sent and completed between the two, the
    /// completion must not look up the withdrawn slot's output. (White-box: drives that order.)
    @Test func completionBetweenWithdrawalAndWaiterRemoval_cancelsTheCaller() async throws {
        let current = PaddedAtomics(count: 1)
        defer { current.deallocate() }
        let state = LockedState(BatcherState<Int, Int, ContinuousClock>(
            maxSize: 10, maxDelay: .seconds(60), maxConcurrentBatches: 1, clock: ContinuousClock(), current: current
        ))
        guard case .claimed(let buffer, let slot, _) = state.withLock({ $0.enqueue() }) else {
            Issue.record("refused")
            return
        }
        let (outcome, generation) = buffer.write(1, at: slot)
        guard let other = buffer.claim() else {
            Issue.record("no second slot")
            return
        }
        _ = buffer.write(2, at: other)
        let caller = Task {
            try await outcome.value(slot: slot) {
                state.withLock { $0.withdraw(buffer, generation: generation, slot: slot) }.resume()
                #expect(state.withLock { $0.snapshot.withdrawn } == 1)
                // What the timer, the supervisor and a handler may do on other threads now:
                state.withLock { $0.timerFired(generation: generation) }.resume()
                guard let batch = state.withLock({ $0.takeBatch() }) else {
                    Issue.record("the due batch was not dispatched")
                    return
                }
                #expect(batch.buffer.takeItemsIfWritten(count: batch.count) == [1, 2])
                #expect(state.withLock { $0.collected(batch.buffer, count: batch.count) } == [slot])
                batch.outcome.complete(.success([4]), slotToOutput: [-1, 0])
            }
        }
        await waitUntil("the caller waits") { outcome.state.withLock { $0.waiters.count } == 1 }
        caller.cancel()
        await #expect(throws: CancellationError.self) { try await caller.value }
    }

    @Test func dueBatch_goesOnGathering_whileEveryHandlerSlotIsBusy() async throws {
        let gate = try await closedGate()
        let sizes = Log<Int>()
        let batcher = Batcher<Int, Int, ContinuousClock>(maxSize: 100, maxDelay: .zero) { items in
            sizes.append(items.count)
            if items == [0] {
                try await gate.acquire()
                gate.release()
            }
            return items
        }
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await batcher.run() }
            let first = try batcher.enqueue(0)
            await waitUntil("the first batch is in the handler") { batcher.stats.inFlightBatches == 1 }
            let tickets = try (1...10).map { try batcher.enqueue($0) }
            #expect(batcher.stats.batches == 1 && batcher.stats.buffered == 10)
            gate.release()
            _ = try await first.value
            for (index, ticket) in tickets.enumerated() { #expect(try await ticket.value == index + 1) }
            batcher.shutdown()
            try await group.waitForAll()
        }
        #expect(sizes.elements == [1, 10], "handler calls: \(sizes.elements)")
    }

    /// Many callers, random cancellations, random handler failures: every caller gets its
    /// own item's result, its batch's error, or a cancellation; the counts add up.
    @Test func randomSchedules_keepTheAccounting() async throws {
        for round in 0..<stressIterations(default: 40) {
            var random = SplitMix64(seed: UInt64(round))
            let maxSize = Int.random(in: 1...8, using: &random)
            let callers = Int.random(in: 1...60, using: &random)
            let batcher = Batcher<Int, Int, ContinuousClock>(
                maxSize: maxSize, maxDelay: .microseconds(Int64.random(in: 0...200, using: &random)),
                maxConcurrentBatches: Int.random(in: 1...3, using: &random)
            ) { items in
                if items.contains(where: { $0 % 13 == 12 }) { throw TestError(id: -1) }
                await Task.yield()
                return items.map { $0 * 2 }
            }
            let cancelEvery = Int.random(in: 2...9, using: &random)
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask { try await batcher.run() }
                try await withThrowingTaskGroup(of: Void.self) { callersGroup in
                    var tasks: [Task<Void, Never>] = []
                    for item in 0..<callers {
                        let task = Task {
                            do {
                                let result = try await batcher.submit(item)
                                #expect(result == item * 2, "caller \(item) got \(result)")
                            } catch is CancellationError {
                            } catch let error as TestError {
                                #expect(error.id == -1)
                            } catch {
                                Issue.record("unexpected \(error)")
                            }
                        }
                        tasks.append(task)
                        if item % cancelEvery == 0 { task.cancel() }
                    }
                    for task in tasks { await task.value }
                    try await callersGroup.waitForAll()
                }
                batcher.shutdown()
                try await group.waitForAll()
            }
            let stats = batcher.stats
            #expect(stats.submitted + stats.unfinished == stats.submitted, "round \(round): \(stats)")
            #expect(stats.submitted == stats.handled + stats.failed + stats.withdrawn, "round \(round): \(stats)")
            #expect(stats.submitted <= callers)
        }
    }
}

extension Batcher where Item == Int, Output == Int, C == ManualClock {
    /// Submits `item` and moves the clock until its batch is sent.
    func submitAfterFlush(_ item: Int, clock: ManualClock) async throws -> Int {
        let ticket = try enqueue(item)
        await clock.waitForSleepers(count: 1)
        clock.advance(by: maxDelay)
        return try await ticket.value
    }
}
