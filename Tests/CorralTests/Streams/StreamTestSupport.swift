import Testing
@testable import Corral

/// `start..<end`, one element per `next()`, counting how many were produced.
struct Counting: AsyncSequence, Sendable {
    let range: Range<Int>
    var produced: Gauge? = nil

    struct AsyncIterator: AsyncIteratorProtocol {
        var next: Int
        let end: Int
        let produced: Gauge?

        mutating func next() async throws -> Int? {
            guard next < end else { return nil }
            defer { next += 1 }
            produced?.add(1)
            await Task.yield()
            return next
        }
    }

    func makeAsyncIterator() -> AsyncIterator {
        AsyncIterator(next: range.lowerBound, end: range.upperBound, produced: produced)
    }
}

/// Yields `elements`, then waits on `gate` (forever, unless released or cancelled), then
/// throws `failure` if set.
struct Scripted: AsyncSequence, Sendable {
    var elements: [Int] = []
    var gate: AsyncSemaphore? = nil
    var failure: TestFailure? = nil
    var cancelled: Gauge? = nil

    struct AsyncIterator: AsyncIteratorProtocol {
        var remaining: ArraySlice<Int>
        let source: Scripted
        var done = false

        mutating func next() async throws -> Int? {
            if let element = remaining.popFirst() { return element }
            guard !done else { return nil }
            done = true
            if let gate = source.gate {
                do {
                    try await gate.acquire()
                } catch {
                    source.cancelled?.add(1)
                    throw error
                }
            }
            if let failure = source.failure { throw failure }
            return nil
        }
    }

    func makeAsyncIterator() -> AsyncIterator {
        AsyncIterator(remaining: elements[...], source: self)
    }
}

/// A semaphore whose one permit is taken: `acquire()` waits until released or cancelled.
func closedGate() async throws -> AsyncSemaphore {
    let gate = AsyncSemaphore(permits: 1)
    try await gate.acquire()
    return gate
}

struct TestFailure: Error, Equatable {
    let id: Int
}

/// Consumes `sequence` in a task slower than its producers (it never has to wait for an
/// element), cancels that task once it has consumed 100 elements, and returns how the task
/// ended and how many elements it took after the cancellation.
///
/// The loop gives up by itself 20,000 elements after the cancellation, so that a sequence
/// that ignores it makes the test fail rather than hang.
func consumeUntilCancelled<S: AsyncSequence & Sendable>(
    _ sequence: S
) async -> (error: (any Error)?, afterCancellation: Int) where S.Element: Sendable {
    let consumed = Gauge()
    let consumer = Task {
        for try await _ in sequence {
            consumed.add(1)
            if consumed.current > 20_100 { return }
            for _ in 0..<20 { await Task.yield() }
        }
    }
    await waitUntil("100 elements consumed") { consumed.current >= 100 }
    consumer.cancel()
    let atCancellation = consumed.current
    let error: (any Error)?
    do {
        try await consumer.value
        error = nil
    } catch let thrown {
        error = thrown
    }
    return (error, consumed.current - atCancellation)
}
