@testable import Corral
import CorralTesting
import Testing

@Suite("fanOut")
struct FanOutTests {
    /// Drains `part` into `log`.
    private func drain(_ part: FanOutSequence<some AsyncSequence<Int, any Error> & Sendable>, into log: Log<Int>) async throws {
        for try await element in part { log.append(element) }
    }

    @Test(arguments: [0, 1, 7, nil])
    func eachElementReachesExactlyOneConsumer(buffer: Int?) async throws {
        let received = Log<Int>()
        let perConsumer = (0..<4).map { _ in Gauge() }
        let parts = Counting(range: 0..<1_000).fanOut(4, buffer: buffer)
        #expect(parts.count == 4)
        try await withThrowingTaskGroup(of: Void.self) { group in
            for (index, part) in parts.enumerated() {
                group.addTask {
                    for try await element in part {
                        received.append(element)
                        perConsumer[index].add(1)
                    }
                }
            }
            try await group.waitForAll()
        }
        #expect(received.elements.sorted() == Array(0..<1_000), "lost or duplicated elements")
        #expect(perConsumer.map(\.current).reduce(0, +) == 1_000)
    }

    @Test func aConsumerThatNeverWaits_stopsWhenCancelled() async throws {
        try await expectNoLeakedTasks {
            let parts = Counting(range: 0..<Int.max).fanOut(2, buffer: 8)
            let (error, after) = await consumeUntilCancelled(parts[0])
            #expect(error is CancellationError, "ended with \(String(describing: error))")
            #expect(after <= 1, "\(after) elements after the cancellation")
        }
    }

    @Test func stalledConsumer_doesNotStallTheOthers() async throws {
        let parts = Counting(range: 0..<300).fanOut(3, buffer: 4)
        var stalled = parts[0].makeAsyncIterator()
        let first = try await stalled.next()   // takes one element, then stops asking
        #expect(first != nil)
        let received = Log<Int>()
        try await withThrowingTaskGroup(of: Void.self) { group in
            for part in parts[1...] {
                group.addTask { try await drain(part, into: received) }
            }
            try await group.waitForAll()
        }
        // The other two got everything else; the stalled one holds nothing back.
        #expect((received.elements + [first!]).sorted() == Array(0..<300))
        #expect(try await stalled.next() == nil)
    }

    @Test func sourceError_reachesEveryConsumer_afterTheBufferedElements() async throws {
        let parts = Scripted(elements: [1, 2, 3], failure: TestFailure(id: 9)).fanOut(2, buffer: 8)
        let received = Log<Int>()
        let failures = Log<TestFailure>()
        await withTaskGroup(of: Void.self) { group in
            for part in parts {
                group.addTask {
                    var iterator = part.makeAsyncIterator()
                    do {
                        while let element = try await iterator.next() { received.append(element) }
                        Issue.record("a consumer ended without the source's error")
                    } catch let failure as TestFailure {
                        failures.append(failure)
                        // The iteration is over after its error.
                        #expect(try! await iterator.next() == nil)
                    } catch {
                        Issue.record("unexpected \(error)")
                    }
                }
            }
        }
        #expect(received.elements.sorted() == [1, 2, 3], "elements already pulled were lost")
        #expect(failures.elements == [TestFailure(id: 9), TestFailure(id: 9)])
    }

    @Test func sourceThrowingAChannelError_reachesTheConsumers() async throws {
        // The feeder must not mistake the source's own ChannelError for its channel closing.
        let source = AsyncThrowingStream<Int, any Error> { continuation in
            continuation.yield(1)
            continuation.finish(throwing: ChannelError<Int>.closed(element: 2))
        }
        let received = Log<Int>()
        let failures = Log<String>()
        await withTaskGroup(of: Void.self) { group in
            for part in source.fanOut(2, buffer: 4) {
                group.addTask {
                    do {
                        for try await element in part { received.append(element) }
                        Issue.record("a consumer ended without the source's error")
                    } catch {
                        failures.append("\(type(of: error))")
                    }
                }
            }
        }
        #expect(received.elements == [1])
        #expect(failures.elements == ["ChannelError<Int>", "ChannelError<Int>"])
    }

    @Test func cancelledConsumer_endsAlone() async throws {
        let source = BoundedChannel<Int>(capacity: 0)
        let parts = source.fanOut(2, buffer: 0)
        let received = Log<Int>()
        let cancelled = Task { try await drain(parts[0], into: received) }
        let other = Task { try await drain(parts[1], into: received) }
        cancelled.cancel()
        await #expect(throws: CancellationError.self) { try await cancelled.value }
        for element in 0..<50 { try await source.send(element) }
        source.close()
        try await other.value
        #expect(received.elements.sorted() == Array(0..<50), "the surviving consumer missed elements")
    }

    @Test func slowConsumer_boundsWhatIsPulled() async throws {
        let produced = Gauge()
        let parts = Counting(range: 0..<1_000, produced: produced).fanOut(1, buffer: 4)
        var iterator = parts[0].makeAsyncIterator()
        _ = try await iterator.next()
        // The feeder fills the buffer and then waits with one element in hand.
        await waitUntil("the buffer filled") { produced.current >= 6 }
        for _ in 0..<1_000 { await Task.yield() }
        #expect(produced.current <= 1 + 4 + 1, "pulled \(produced.current) with one element taken and a buffer of 4")
    }

    @Test func droppingEveryConsumer_stopsTheSource_andLeavesNoTask() async throws {
        let sourceCancelled = Gauge()
        try await expectNoLeakedTasks {
            let gate = try await closedGate()
            let parts = Scripted(elements: [1, 2], gate: gate, cancelled: sourceCancelled).fanOut(3)
            var iterator = parts[1].makeAsyncIterator()
            #expect(try await iterator.next() == 1)
            #expect(try await iterator.next() == 2)
            // The source now waits on the gate; the consumers and their iterators go away.
        }
        #expect(sourceCancelled.current == 1, "the source's iteration was not cancelled")
    }

    @Test func emptySource_endsEveryConsumer() async throws {
        for part in Counting(range: 0..<0).fanOut(3) {
            var iterator = part.makeAsyncIterator()
            #expect(try await iterator.next() == nil)
        }
    }

    @Test func theFeeder_isNotBoundByTheDeadlineOfTheConsumerThatStartedIt() async throws {
        // Consumer A starts the feeder under a 3 s deadline and leaves. The source then
        // times out on its own (4 s); before the fix the feeder inherited A's deadline,
        // the source's timeout ran "inline" under it, nothing ever cancelled the feeder, and
        // consumer B waited forever (here: until its 10 s guard).
        try await expectNoLeakedTasks {
            let gate = try await closedGate()
            let parts = SelfTimedSource(gate: gate).fanOut(2, buffer: 0)
            let first = parts[0], second = parts[1]
            // (3 s, not less: on a loaded CI machine A's first element has taken over 1 s.)
            let element = try await withTimeout(.seconds(3)) { () async throws -> Int? in
                var iterator = first.makeAsyncIterator()
                return try await iterator.next()
            }
            #expect(element == 1)
            var outcome: (any Error)?
            do {
                try await withTimeout(.seconds(10)) { for try await _ in second {} }
            } catch {
                outcome = error
            }
            #expect(outcome as? TestFailure == TestFailure(id: 7), "got \(String(describing: outcome))")
        }
    }
}

/// First `next()`: 1. Second: waits on `gate` under its own 4 s timeout, and turns that
/// timeout into `TestFailure(id: 7)`.
private struct SelfTimedSource: AsyncSequence, Sendable {
    let gate: AsyncSemaphore

    struct AsyncIterator: AsyncIteratorProtocol {
        let gate: AsyncSemaphore
        var sent = false

        mutating func next() async throws -> Int? {
            if !sent {
                sent = true
                return 1
            }
            let gate = self.gate
            do {
                try await withTimeout(.seconds(4)) { try await gate.acquire() }
            } catch is TimeoutError {
                throw TestFailure(id: 7)
            }
            return nil
        }
    }

    func makeAsyncIterator() -> AsyncIterator { AsyncIterator(gate: gate) }
}
