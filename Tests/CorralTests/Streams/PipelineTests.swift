@testable import Corral
import CorralTesting
import Testing

private struct Order: Sendable, Equatable {
    let id: Int
}

private struct Priced: Sendable, Equatable {
    let id: Int
    let cents: Int
}

@Suite("Pipeline stages")
struct PipelineTests {
    @Test func stagesChangeTheType_keepTheOrder_andCountEverything() async throws {
        let count = 300
        let pipeline = Counting(range: 0..<count)
            .stage("wrap") { Order(id: $0) }
            .stage("price", concurrency: 4, buffer: 8) { order in
                await Task.yield()
                return Priced(id: order.id, cents: order.id * 100)
            }
            .stage("describe") { "\($0.id):\($0.cents)" }
        let received = try await expectNoLeakedTasks {
            var received: [String] = []
            for try await line in pipeline { received.append(line) }
            return received
        }
        #expect(received == (0..<count).map { "\($0):\($0 * 100)" })
        let stats = pipeline.pipelineStats
        #expect(stats.map(\.name) == ["wrap", "price", "describe"])
        for stage in stats {
            #expect(stage.received == count && stage.emitted == count, "\(stage)")
            #expect(stage.inFlight == 0 && stage.skipped == 0 && stage.retried == 0, "\(stage)")
        }
    }

    @Test func unorderedStage_deliversEverything() async throws {
        var received: [Int] = []
        for try await value in Counting(range: 0..<200).stage("any order", concurrency: 4, ordered: false, { value in
            for _ in 0..<(value % 7) { await Task.yield() }
            return value
        }) {
            received.append(value)
        }
        #expect(received.sorted() == Array(0..<200))
    }

    @Test func failPolicy_endsThePipelineWithTheError_andCancelsEveryStage() async throws {
        let cancelled = Gauge()
        let blocking = Gauge()
        try await expectNoLeakedTasks {
            let gate = try await closedGate()
            let pipeline = Counting(range: 0..<100)
                .stage("first") { $0 }
                .stage("second", concurrency: 2, buffer: 2) { value -> Int in
                    if value == 5 {
                        await waitUntil("another transform blocks") { blocking.current >= 1 }
                        throw TestFailure(id: 5)
                    }
                    if value > 5 {
                        blocking.add(1)
                        do {
                            try await gate.acquire()
                        } catch {
                            cancelled.add(1)
                            throw error
                        }
                    }
                    return value
                }
                .stage("third") { $0 * 2 }
            var received: [Int] = []
            var thrown: (any Error)?
            do {
                for try await value in pipeline { received.append(value) }
            } catch {
                thrown = error
            }
            #expect(thrown as? TestFailure == TestFailure(id: 5))
            #expect(received == Array(0..<received.count).map { $0 * 2 })
            #expect(received.count <= 5)
        }
        #expect(cancelled.current == blocking.current)  // every blocked transform was cancelled
        #expect(blocking.current >= 1)
    }

    @Test func skipPolicy_leavesFailedElementsOut_countsThem_andKeepsTheErrors() async throws {
        let pipeline = Counting(range: 0..<50)
            .stage("odd only", onError: .skip) { value -> Int in
                if value % 2 == 0 { throw TestFailure(id: value) }
                return value
            }
        var received: [Int] = []
        for try await value in pipeline { received.append(value) }
        #expect(received == Array(stride(from: 1, to: 50, by: 2)))
        #expect(pipeline.stats.skipped == 25)
        #expect(pipeline.stats.emitted == 25)
        #expect(pipeline.stats.inFlight == 0)
        let errors = pipeline.recentErrors
        #expect(errors.count == 25)
        #expect(errors.allSatisfy { $0.stage == "odd only" && $0.attempts == 1 })
        #expect(errors.compactMap { ($0.error as? TestFailure)?.id } == Array(stride(from: 0, to: 50, by: 2)))
    }

    @Test func retryPolicy_triesAgain_andSucceeds() async throws {
        let attempts = LockedState<[Int: Int]>([:])
        let pipeline = Counting(range: 0..<20)
            .stage("flaky", concurrency: 3, onError: .retry(attempts: 3, backoff: .zero)) { value -> Int in
                let attempt = attempts.withLock { $0[value, default: 0] += 1; return $0[value]! }
                if attempt < 3 { throw TestFailure(id: value) }
                return value
            }
        var received: [Int] = []
        for try await value in pipeline { received.append(value) }
        #expect(received == Array(0..<20))
        #expect(pipeline.stats.retried == 40)
        #expect(pipeline.stats.skipped == 0)
    }

    @Test func retryPolicy_thenSkip_leavesOutWhatNeverSucceeds() async throws {
        let pipeline = Counting(range: 0..<10)
            .stage("hopeless", onError: .retry(attempts: 3, backoff: .zero, then: .skip)) { value -> Int in
                if value == 4 { throw TestFailure(id: value) }
                return value
            }
        var received: [Int] = []
        for try await value in pipeline { received.append(value) }
        #expect(received == [0, 1, 2, 3, 5, 6, 7, 8, 9])
        #expect(pipeline.stats.retried == 2)
        #expect(pipeline.recentErrors.map(\.attempts) == [3])
    }

    @Test func retryPolicy_thenFail_endsThePipeline() async throws {
        let pipeline = Counting(range: 0..<10)
            .stage("hopeless", onError: .retry(attempts: 2, backoff: .microseconds(1))) { value -> Int in
                if value == 4 { throw TestFailure(id: value) }
                return value
            }
        await #expect(throws: TestFailure(id: 4)) {
            for try await _ in pipeline {}
        }
        #expect(pipeline.stats.retried == 1)
    }

    @Test func aSlowConsumer_holdsTheSourceToTheSumOfTheBuffers() async throws {
        let produced = Gauge()
        let pipeline = Counting(range: 0..<10_000, produced: produced)
            .stage("a", buffer: 3) { $0 }
            .stage("b", concurrency: 2, buffer: 5) { $0 }
            .stage("c", buffer: 4) { $0 }
        var iterator = pipeline.makeAsyncIterator()
        #expect(try await iterator.next() == 0)
        // (At least: the stage takes another element as soon as the consumer returns one,
        // so the count may already be past 4 when it is read.)
        await waitUntil("the last buffer fills") { pipeline.stats.received >= 4 }
        for _ in 0..<2_000 { await Task.yield() }
        // Each stage holds at most its buffer of elements it took and has not returned: the
        // source is at most 3 + 5 + 4 ahead of the one element the consumer took.
        #expect(produced.current <= 1 + 12)
        let stats = pipeline.pipelineStats
        #expect(zip(stats.map(\.inFlight), [3, 5, 4]).allSatisfy { $0 <= $1 }, "\(stats)")
        var count = 1
        while try await iterator.next() != nil { count += 1 }
        #expect(count == 10_000)
    }

    @Test func stats_showWhereThePipelineWaits() async throws {
        let gate = try await closedGate()
        let pipeline = Counting(range: 0..<40)
            .stage("fast", buffer: 2) { $0 }
            .stage("slow", buffer: 2) { value -> Int in
                if value == 0 {
                    try await gate.acquire()  // held until "fast" is blocked
                    gate.release()
                }
                return value
            }
            .stage("after", buffer: 2) { $0 }
        let consumer = Task {
            var count = 0
            for try await _ in pipeline { count += 1 }
            return count
        }
        // "fast" fills its buffer and waits for room; "after" has nothing to do.
        await waitUntil("fast is full") { pipeline.pipelineStats[0].received >= 2 }
        for _ in 0..<100 { await Task.yield() }
        gate.release()
        #expect(try await consumer.value == 40)
        let stats = pipeline.pipelineStats
        #expect(stats[0].waitingForOutput > .zero)
        #expect(stats[2].waitingForInput > .zero)
    }

    @Test func cancellingTheConsumer_cancelsEveryStage() async throws {
        let cancelled = Gauge()
        let started = Gauge()
        try await expectNoLeakedTasks {
            let gate = try await closedGate()
            let pipeline = Counting(range: 0..<100)
                .stage("first") { $0 }
                .stage("blocked", concurrency: 2) { value -> Int in
                    started.add(1)
                    do {
                        try await gate.acquire()
                    } catch {
                        cancelled.add(1)
                        throw error
                    }
                    return value
                }
            let consumer = Task { for try await _ in pipeline {} }
            await waitUntil("both transforms block") { started.current == 2 }
            consumer.cancel()
            await #expect(throws: CancellationError.self) { try await consumer.value }
        }
        #expect(cancelled.current == 2)
    }

    /// However an iteration ends — finished, failed, stopped early or cancelled — every
    /// element a stage received is accounted for once it is over: nothing stays in flight.
    @Test func inFlight_returnsToZero_howeverTheIterationEnds() async throws {
        for round in 0..<stressIterations(default: 40) {
            let concurrency = [1, 1, 3][round % 3]
            let failAt = Bool.random() ? Int.random(in: 0..<60) : nil
            let stopAfter = Bool.random() ? Int.random(in: 0..<60) : nil
            let stage = Counting(range: 0..<60).stage("s", concurrency: concurrency, buffer: Int.random(in: 1...8)) { value in
                for _ in 0..<Int.random(in: 0..<10) { await Task.yield() }
                if value == failAt { throw TestFailure(id: value) }
                return value
            }
            let consumer = Task {
                var taken = 0
                for try await _ in stage {
                    taken += 1
                    if taken == stopAfter { break }
                }
            }
            if Bool.random() { consumer.cancel() }
            _ = try? await consumer.value
            await waitUntil("round \(round): nothing in flight, \(stage.stats)") { stage.stats.inFlight == 0 }
            let stats = stage.stats
            #expect(stats.emitted <= stats.received && stats.received <= 60, "\(stats)")
        }
    }

    /// The element in a transform is received and in flight, whatever the concurrency (a lone
    /// worker included), so that a hung transform shows in the stats and as a stall.
    @Test(arguments: [1, 2])
    func elementInATransform_isInFlight(concurrency: Int) async throws {
        let gate = try await closedGate()
        let entered = Gauge()
        let source = AsyncStream<Int> { continuation in continuation.yield(1) }  // never finishes
        let name = "in-flight-\(concurrency)"
        let stage = source.stage("hang", concurrency: concurrency) { value in
            entered.add(1)
            try await gate.acquire()
            return value
        }
        CorralDiagnostics.track(pipeline: name, stage)
        let consumer = Task { for try await _ in stage {} }
        await waitUntil("the transform is running") { entered.current == 1 }
        #expect(stage.stats.received == 1 && stage.stats.inFlight == 1, "\(stage.stats)")
        let snapshot = { CorralDiagnostics.snapshot().structures.first { $0.name == "\(name)/hang" } }
        _ = snapshot()
        #expect(try #require(snapshot()).stalledFor != nil, "a hung transform is not reported as stalled")
        consumer.cancel()
        _ = try? await consumer.value
        await waitUntil("the element is no longer in flight") { stage.stats.inFlight == 0 }
    }
}
