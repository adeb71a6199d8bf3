@testable import Corral
import CorralTesting
import Testing

/// Yields a random number of times: a transform that takes a random while, without sleeping.
private func jitter() async {
    for _ in 0..<Int.random(in: 0..<20) { await Task.yield() }
}

@Suite("map(concurrency:)")
struct MapStreamTests {
    @Test(arguments: [(1, true), (4, true), (4, false)])
    func aConsumerThatNeverWaits_stopsWithinAFewResults_whenCancelled(concurrency: Int, ordered: Bool) async throws {
        try await expectNoLeakedTasks {
            let (error, after) = await consumeUntilCancelled(
                Counting(range: 0..<Int.max).map(concurrency: concurrency, ordered: ordered) { $0 })
            #expect(error is CancellationError, "ended with \(String(describing: error))")
            #expect(after <= 64, "\(after) results after the cancellation")
        }
    }

    @Test(arguments: [1, 3])
    func compactMap_leavingOutHundredsInARow_goesOn(concurrency: Int) async throws {
        // The fast path's cancellation countdown counts left-out results too: once it ran out
        // inside next()'s loop, nothing more was taken (a livelock).
        let results = try await expectNoLeakedTasks {
            try await withTimeout(.seconds(30)) {  // (a regression fails rather than hangs)
                var results: [Int] = []
                for try await value in Counting(range: 0..<2_000).compactMap(concurrency: concurrency, buffer: 8, { $0 % 500 == 499 ? $0 : nil }) {
                    results.append(value)
                }
                return results
            }
        }
        #expect(results == [499, 999, 1_499, 1_999])
    }

    @Test func aBufferBelowTheConcurrency_startsNoMoreTransformTasksThanItHolds() async throws {
        let ledger = TaskLedger()
        @Sendable func iterate() async throws -> [Int?] {
            var iterator = Counting(range: 0..<3).map(concurrency: 100_000, buffer: 2) { $0 }.makeAsyncIterator()
            let first = try await iterator.next()
            // The feeder and two workers: a buffer of 2 keeps more from ever being busy.
            #expect(ledger.liveTaskCount <= 3, "\(ledger.liveTasks)")
            return [first, try await iterator.next(), try await iterator.next(), try await iterator.next()]
        }
        let results = try await TaskLedger.$current.withValue(ledger) { try await iterate() }
        #expect(results == [0, 1, 2, nil])
    }

    @Test(arguments: [(1, 1), (4, 4), (4, 7), (8, 64), (3, 1000)])
    func ordered_keepsTheSourceOrder_underRandomDelays(concurrency: Int, buffer: Int) async throws {
        let count = 400
        let received = try await expectNoLeakedTasks {
            var received: [Int] = []
            let mapped = Counting(range: 0..<count).map(concurrency: concurrency, buffer: buffer) { value in
                await jitter()
                return value * 2
            }
            for try await value in mapped { received.append(value) }
            return received
        }
        #expect(received == (0..<count).map { $0 * 2 })
    }

    @Test(arguments: [(1, 1), (4, 4), (4, 7), (8, 64)])
    func unordered_deliversEveryResultOnce(concurrency: Int, buffer: Int) async throws {
        let count = 400
        let received = try await expectNoLeakedTasks {
            var received: [Int] = []
            let mapped = Counting(range: 0..<count).map(concurrency: concurrency, ordered: false, buffer: buffer) { value in
                await jitter()
                return value * 2
            }
            for try await value in mapped { received.append(value) }
            return received
        }
        #expect(received.count == count)
        #expect(received.sorted() == (0..<count).map { $0 * 2 })
    }

    /// Results left out by compactMap still take their turn in the results' ring: with a
    /// buffer of 2 the ring wraps around hundreds of times.
    @Test(arguments: [(1, true), (3, true), (3, false)])
    func compactMap_leavesNilsOut(concurrency: Int, ordered: Bool) async throws {
        let count = 400
        let received = try await expectNoLeakedTasks {
            var received: [Int] = []
            let mapped = Counting(range: 0..<count).compactMap(concurrency: concurrency, ordered: ordered, buffer: 2) { value in
                await jitter()
                return value % 3 == 0 ? nil : value
            }
            for try await value in mapped { received.append(value) }
            return received
        }
        let expected = (0..<count).filter { $0 % 3 != 0 }
        #expect(ordered ? received == expected : received.sorted() == expected)
    }

    /// A transform whose results are optional: `nil` is an element like any other, not the
    /// end of the sequence.
    @Test(arguments: [true, false])
    func optionalResults_areElements(ordered: Bool) async throws {
        var received: [Int?] = []
        let mapped = Counting(range: 0..<100).map(concurrency: 3, ordered: ordered, buffer: 4) { value -> Int? in
            await jitter()
            return value % 2 == 0 ? nil : value
        }
        for try await value in mapped { received.append(value) }
        #expect(received.count == 100)
        #expect(received.filter { $0 == nil }.count == 50)
        let values = received.compactMap { $0 }
        #expect(ordered ? values == Array(stride(from: 1, to: 100, by: 2)) : values.sorted() == Array(stride(from: 1, to: 100, by: 2)))
    }

    @Test func anEmptySource_endsAtOnce() async throws {
        var iterator = Counting(range: 0..<0).map(concurrency: 4) { $0 }.makeAsyncIterator()
        #expect(try await iterator.next() == nil)
        #expect(try await iterator.next() == nil)
    }

    @Test func eachIteration_startsTheSourceAgain() async throws {
        let mapped = Counting(range: 0..<10).map(concurrency: 3) { $0 + 1 }
        for _ in 0..<2 {
            var received: [Int] = []
            for try await value in mapped { received.append(value) }
            #expect(received == Array(1...10))
        }
    }

    @Test func exactly_concurrency_transformsRun_atOnce() async throws {
        let running = Gauge()
        let gate = try await closedGate()
        let concurrency = 5
        let mapped = Counting(range: 0..<50).map(concurrency: concurrency, ordered: false, buffer: 50) { value in
            running.add(1)
            try await gate.acquire()
            gate.release()
            running.add(-1)
            return value
        }
        let consumer = Task {
            var count = 0
            for try await _ in mapped { count += 1 }
            return count
        }
        await waitUntil("every worker busy") { running.current == concurrency }
        for _ in 0..<1_000 { await Task.yield() }
        #expect(running.current == concurrency)  // the others wait for a worker
        gate.release()
        #expect(try await consumer.value == 50)
        #expect(running.peak == concurrency)
    }

    @Test(arguments: [true, false])
    func aSlowConsumer_boundsWhatIsPulledFromTheSource_toTheBuffer(ordered: Bool) async throws {
        let produced = Gauge()
        let buffer = 12
        let mapped = Counting(range: 0..<10_000, produced: produced).map(concurrency: 3, ordered: ordered, buffer: buffer) { $0 }
        var iterator = mapped.makeAsyncIterator()
        _ = try await iterator.next()
        await waitUntil("the window fills") { produced.current == buffer }
        for _ in 0..<1_000 { await Task.yield() }
        #expect(produced.current == buffer)
        // Consuming returns credit: the source moves on.
        for _ in 0..<buffer { _ = try await iterator.next() }
        await waitUntil("the source is pulled again") { produced.current > buffer }
    }

    @Test(arguments: [true, false])
    func theFirstTransformError_endsTheSequence_andCancelsTheOthers(ordered: Bool) async throws {
        let cancelled = Gauge()
        try await expectNoLeakedTasks {
            let gate = try await closedGate()
            let mapped = Counting(range: 0..<100).map(concurrency: 4, ordered: ordered) { value in
                if value == 3 { throw TestFailure(id: 3) }
                do {
                    try await gate.acquire()  // every other transform hangs until cancelled
                } catch {
                    cancelled.add(1)
                    throw error
                }
                return value
            }
            var thrown: (any Error)?
            do {
                for try await _ in mapped {}
            } catch {
                thrown = error
            }
            #expect(thrown as? TestFailure == TestFailure(id: 3))
        }
        #expect(cancelled.current >= 1)  // the transforms that were hanging were cancelled
    }

    @Test func aSourceError_endsTheSequence() async throws {
        try await expectNoLeakedTasks {
            let source = Scripted(elements: [1, 2, 3], failure: TestFailure(id: 9))
            var received: [Int] = []
            var thrown: (any Error)?
            do {
                for try await value in source.map(concurrency: 2, { $0 }) { received.append(value) }
            } catch {
                thrown = error
            }
            #expect(thrown as? TestFailure == TestFailure(id: 9))
            #expect(received.allSatisfy { [1, 2, 3].contains($0) })
        }
    }

    @Test func aSourceFailingAtOnce_whileTheWorkersAreStarting_endsWithItsError() async throws {
        // The feeder starts first and may fail the iteration (which starts no more tasks)
        // before the consumer has started every worker: that must end the sequence with the
        // error, not trap because a worker could not be started.
        for _ in 0..<stressIterations(default: 300) {
            try await expectNoLeakedTasks {
                let source = Scripted(failure: TestFailure(id: 1))
                var thrown: (any Error)?
                do {
                    for try await _ in source.map(concurrency: 8, { $0 }) {}
                } catch {
                    thrown = error
                }
                #expect(thrown as? TestFailure == TestFailure(id: 1))
            }
        }
    }

    @Test func cancellingTheConsumer_throwsCancellationError_andCancelsTheTransforms() async throws {
        let cancelled = Gauge()
        let started = Gauge()
        try await expectNoLeakedTasks {
            let gate = try await closedGate()
            let mapped = Counting(range: 0..<100).map(concurrency: 3) { value in
                started.add(1)
                do {
                    try await gate.acquire()
                } catch {
                    cancelled.add(1)
                    throw error
                }
                return value
            }
            let consumer = Task {
                for try await _ in mapped {}
            }
            await waitUntil("three transforms hang") { started.current == 3 }
            consumer.cancel()
            await #expect(throws: CancellationError.self) { try await consumer.value }
        }
        #expect(cancelled.current == 3)
    }

    @Test func aConsumerUnderADeadline_throwsTimeoutError() async throws {
        try await expectNoLeakedTasks {
            let gate = try await closedGate()
            let mapped = Counting(range: 0..<10).map(concurrency: 2) { value in
                try await gate.acquire()
                return value
            }
            await #expect(throws: TimeoutError.self) {
                try await withTimeout(.milliseconds(20)) {
                    for try await _ in mapped {}
                }
            }
        }
    }

    @Test func stoppingEarly_cancelsEverything_andLeaksNoTask() async throws {
        let cancelled = Gauge()
        let hanging = Gauge()
        try await expectNoLeakedTasks {
            let mapped = Counting(range: 0..<1_000_000).map(concurrency: 4, ordered: false) { value in
                if value >= 10 {
                    hanging.add(1)
                    do {
                        try await Task.sleep(for: .seconds(3600))
                    } catch {
                        cancelled.add(1)
                        throw error
                    }
                }
                return value
            }
            var taken = 0
            for try await _ in mapped {
                taken += 1
                if taken == 5 {
                    await waitUntil("a transform hangs") { hanging.current >= 1 }
                    break
                }
            }
            #expect(taken == 5)
        }
        #expect(cancelled.current >= 1)
    }

    /// Random sizes, random failures and random early stops: whatever happens, an ordered
    /// iteration returns a prefix of the expected results, an unordered one distinct
    /// expected results, and no task is left behind.
    @Test func randomSchedules_keepTheInvariants() async throws {
        for round in 0..<stressIterations(default: 60) {
            let count = Int.random(in: 0..<300)
            let concurrency = Int.random(in: 1...6)
            let buffer = Int.random(in: 1...40)
            let ordered = Bool.random()
            let failAt = count > 0 && Bool.random() ? Int.random(in: 0..<count) : nil
            let stopAfter = Bool.random() ? Int.random(in: 0...count) : nil
            let received = try await expectNoLeakedTasks {
                let mapped = Counting(range: 0..<count).map(concurrency: concurrency, ordered: ordered, buffer: buffer) { value in
                    await jitter()
                    if value == failAt { throw TestFailure(id: value) }
                    return value
                }
                var received: [Int] = []
                do {
                    for try await value in mapped {
                        received.append(value)
                        if received.count == stopAfter { break }
                    }
                    if let failAt, stopAfter == nil {
                        Issue.record("round \(round): no error although element \(failAt) failed")
                    }
                } catch let failure as TestFailure {
                    #expect(failure.id == failAt)
                }
                return received
            }
            if ordered {
                #expect(received == Array(0..<received.count), "round \(round)")
            } else {
                #expect(Set(received).count == received.count, "round \(round)")
                #expect(received.allSatisfy { (0..<count).contains($0) && $0 != failAt })
            }
            if failAt == nil, stopAfter == nil {
                #expect(received.count == count, "round \(round)")
            }
        }
    }

    @Test func actorIsolatedTransform_runsOnItsActor() async throws {
        let doubled = Counting(range: 0..<20).map(concurrency: 4) { @MainActor value in
            MainActor.preconditionIsolated("the transform left its actor")
            return value * 2
        }
        var results: [Int] = []
        for try await value in doubled { results.append(value) }
        #expect(results == (0..<20).map { $0 * 2 })
    }

    @Test func afterTheConsumerStops_workersStartNoFurtherTransform() async throws {
        // A worker takes a chunk of the input at once. Once the consumer has stopped, it must
        // not go on transforming the rest of its chunk (transforms that ignore cancellation,
        // like CPU work, would otherwise outlive the iteration).
        let produced = Gauge(), stopped = Gauge(), startedAfterStop = Gauge()
        try await expectNoLeakedTasks {
            let mapped = Counting(range: 0..<64, produced: produced)
                .map(concurrency: 2, ordered: false, buffer: 64) { value in
                    if stopped.current > 0 { startedAfterStop.add(1) }
                    if value < 2 {
                        // The first two: hold on until the whole input is queued, so that each
                        // worker then takes a chunk of it.
                        await waitUntil("the window is full") { produced.current == 64 }
                    } else {
                        // The first of each chunk: hold on (ignoring cancellation) until the
                        // consumer has gone.
                        await waitUntil("the consumer stopped") { stopped.current > 0 }
                    }
                    return value
                }
            do {
                var iterator = mapped.makeAsyncIterator()
                _ = try await iterator.next()
            }  // the iterator is dropped here: the consumer stops early
            stopped.add(1)
        }
        #expect(startedAfterStop.current == 0, "\(startedAfterStop.current) transforms started after the consumer stopped")
    }

    @Test func aCopiedIterator_doesNotStartTheTasksTwice() async throws {
        // Copies of an iterator share its iteration. Before, each copy started its own set
        // of tasks on the shared state on its first next(), and the second set trapped.
        try await expectNoLeakedTasks {
            var first = Counting(range: 0..<100).map(concurrency: 2, ordered: false) { $0 }.makeAsyncIterator()
            var second = first
            var received: [Int] = []
            if let value = try await first.next() { received.append(value) }   // starts the tasks
            if let value = try await second.next() { received.append(value) }  // must not start more
            while let value = try await first.next() { received.append(value) }
            while let value = try await second.next() { received.append(value) }
            #expect(received.sorted() == Array(0..<100))  // every element once, across the copies
        }
    }
}
