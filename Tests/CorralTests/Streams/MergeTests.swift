@testable import Corral
import CorralTesting
import Testing

@Suite("merge")
struct MergeTests {
    @Test func everyElementOfEverySource_arrives_eachSourceInItsOrder() async throws {
        let sourceCount = 100, perSource = 50
        let received = try await expectNoLeakedTasks {
            let sources = (0..<sourceCount).map { Counting(range: $0 * 1000..<$0 * 1000 + perSource) }
            var received: [Int] = []
            for try await element in merge(sources) {
                received.append(element)
            }
            return received
        }
        #expect(received.count == sourceCount * perSource)
        var lastOfSource = [Int: Int]()
        for element in received {
            let source = element / 1000
            if let last = lastOfSource[source] { #expect(element == last + 1) }
            lastOfSource[source] = element
        }
        #expect(Set(received) == Set((0..<sourceCount).flatMap { $0 * 1000..<$0 * 1000 + perSource }))
    }

    @Test func noSources_endsAtOnce() async throws {
        var iterator = merge([Counting]()).makeAsyncIterator()
        #expect(try await iterator.next() == nil)
        #expect(try await iterator.next() == nil)
    }

    @Test func oneSource_isPassedThroughInOrder() async throws {
        var received: [Int] = []
        for try await element in merge([Counting(range: 0..<20)]) {
            received.append(element)
        }
        #expect(received == Array(0..<20))
    }

    @Test func eachIteration_startsTheSourcesAgain() async throws {
        let merged = merge([Counting(range: 0..<3), Counting(range: 10..<13)])
        for _ in 0..<2 {
            var received: [Int] = []
            for try await element in merged { received.append(element) }
            #expect(received.sorted() == [0, 1, 2, 10, 11, 12])
        }
    }

    @Test func theFirstError_endsTheStream_andCancelsTheOtherSources() async throws {
        let cancelled = Gauge()
        try await expectNoLeakedTasks {
            let blocked = try await closedGate()
            let failNow = try await closedGate()
            let sources = [
                Scripted(elements: [1], gate: failNow, failure: TestFailure(id: 7)),
                Scripted(elements: [100], gate: blocked, cancelled: cancelled),
                Scripted(elements: [200], gate: blocked, cancelled: cancelled),
            ]
            var iterator = merge(sources).makeAsyncIterator()
            var received: [Int] = []
            for _ in 0..<3 { received.append(try await iterator.next()!) }
            #expect(received.sorted() == [1, 100, 200])
            await waitUntil("both sources blocked") { blocked.waiters == 2 }
            failNow.release()
            var thrown: (any Error)?
            do {
                _ = try await iterator.next()
            } catch {
                thrown = error
            }
            #expect(thrown as? TestFailure == TestFailure(id: 7))
            // Ended: later calls return nil.
            let afterTheEnd = try await iterator.next()
            #expect(afterTheEnd == nil)
        }
        #expect(cancelled.current == 2)  // both blocked sources saw cancellation
    }

    @Test func aSourcesOwnCancellationError_isReported_notSwallowed() async throws {
        struct ThrowsCancellation: AsyncSequence, Sendable {
            struct AsyncIterator: AsyncIteratorProtocol {
                mutating func next() async throws -> Int? { throw CancellationError() }
            }
            func makeAsyncIterator() -> AsyncIterator { AsyncIterator() }
        }
        await #expect(throws: CancellationError.self) {
            for try await _ in merge([ThrowsCancellation()]) {}
        }
    }

    @Test func cancellingTheConsumer_throwsCancellationError_andCancelsTheSources() async throws {
        let cancelled = Gauge()
        let gotFirst = try await closedGate()
        try await expectNoLeakedTasks {
            let blocked = try await closedGate()
            let sources = [
                Scripted(elements: [1], gate: blocked, cancelled: cancelled),
                Scripted(elements: [], gate: blocked, cancelled: cancelled),
            ]
            let consumer = Task {
                var received: [Int] = []
                for try await element in merge(sources) {
                    received.append(element)
                    gotFirst.release()
                }
                return received
            }
            try await gotFirst.acquire()
            await waitUntil("both sources blocked") { blocked.waiters == 2 }
            consumer.cancel()
            await #expect(throws: CancellationError.self) { try await consumer.value }
        }
        #expect(cancelled.current == 2)
    }

    @Test func stoppingEarly_cancelsTheSources_andLeaksNoTask() async throws {
        // The leak check fails if a source is left running (parked on the gate or on a send).
        try await expectNoLeakedTasks {
            let blocked = try await closedGate()
            let sources = (0..<8).map { Scripted(elements: Array($0 * 10..<$0 * 10 + 5), gate: blocked) }
            var taken = 0
            for try await _ in merge(sources) {
                taken += 1
                if taken == 3 { break }
            }
            #expect(taken == 3)
        }
    }

    @Test func aSlowConsumer_holdsBackTheSources() async throws {
        let produced = Gauge()
        let source = Counting(range: 0..<1_000, produced: produced)
        var iterator = merge([source]).makeAsyncIterator()
        #expect(try await iterator.next() == 0)
        // One element buffered, one waiting to be sent: the source goes no further.
        await waitUntil("the source fills the buffer") { produced.current == 3 }
        for _ in 0..<1_000 { await Task.yield() }
        #expect(produced.current == 3)
        #expect(try await iterator.next() == 1)
        #expect(try await iterator.next() == 2)
    }

    @Test func aConsumerThatNeverWaits_stopsWhenCancelled() async throws {
        try await expectNoLeakedTasks {
            let (error, after) = await consumeUntilCancelled(
                merge([Counting(range: 0..<Int.max), Counting(range: 0..<Int.max)]))
            #expect(error is CancellationError, "ended with \(String(describing: error))")
            #expect(after <= 1, "\(after) elements after the cancellation")
        }
    }

    @Test func aFastSource_mayFillTheSlotsOfEndedOnes_butNoMore() async throws {
        let produced = Gauge()
        let sources = [
            Counting(range: 0..<1_000, produced: produced),
            Counting(range: 0..<0), Counting(range: 0..<0), Counting(range: 0..<0),
        ]
        var iterator = merge(sources).makeAsyncIterator()
        #expect(try await iterator.next() == 0)
        // One returned, four buffered (a slot per source), one waiting to be buffered.
        await waitUntil("the source fills the buffer") { produced.current == 6 }
        for _ in 0..<1_000 { await Task.yield() }
        #expect(produced.current == 6)
        for expected in 1..<10 { #expect(try await iterator.next() == expected) }
    }

    @Test func aSourceThrowingAChannelErrorOfItsOwn_failsTheStream() async throws {
        // Only a failed send means "the iteration ended"; a ChannelError thrown by a source
        // (one that reads a closed Corral channel, say) is that source's failure.
        try await expectNoLeakedTasks {
            var thrown: (any Error)?
            do {
                for try await _ in merge([ChannelErrorSource(), ChannelErrorSource()]) {}
            } catch {
                thrown = error
            }
            #expect(thrown as? ChannelError<Int> != nil, "the sources' error was swallowed")
        }
    }
}

/// Yields 1, then throws a `ChannelError<Int>` of its own.
private struct ChannelErrorSource: AsyncSequence, Sendable {
    struct AsyncIterator: AsyncIteratorProtocol {
        var sent = false

        mutating func next() async throws -> Int? {
            if !sent {
                sent = true
                return 1
            }
            throw ChannelError<Int>.closed(element: 2)
        }
    }

    func makeAsyncIterator() -> AsyncIterator { AsyncIterator() }
}
