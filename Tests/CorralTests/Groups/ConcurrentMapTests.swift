@testable import Corral
import CorralTesting
import Testing

@Suite("concurrentMap")
struct ConcurrentMapTests {
    @Test(arguments: [1, 3, 8, 1_000])
    func results_areInInputOrder(limit: Int) async throws {
        let input = Array(0..<500)
        let output = try await expectNoLeakedTasks {
            try await input.concurrentMap(limit: limit) { value in
                if value.isMultiple(of: 7) { await Task.yield() }  // finish out of order
                return value * 2
            }
        }
        #expect(output == input.map { $0 * 2 })
    }

    @Test func emptyInput_returnsEmpty_withoutStartingTasks() async throws {
        let output = try await [Int]().concurrentMap(limit: 4) { $0 }
        #expect(output.isEmpty)
    }

    @Test(arguments: [1, 2, 4])
    func theLimit_isNeverExceeded(limit: Int) async throws {
        let running = Gauge()
        try await (0..<200).concurrentForEach(limit: limit) { _ in
            running.add(1)
            await Task.yield()
            running.add(-1)
        }
        #expect(running.peak <= limit)
        #expect(running.current == 0)
    }

    @Test func compactMap_dropsNils_andKeepsOrder() async throws {
        let output: [Int] = try await (0..<100).concurrentCompactMap(limit: 5) { $0.isMultiple(of: 3) ? $0 : nil }
        #expect(output == Array(stride(from: 0, to: 100, by: 3)))
    }

    @Test func firstError_isThrown_andTheRestAreCancelled() async throws {
        let started = Gauge()
        let cancelled = Gauge()
        await #expect(throws: TestError(id: 3)) {
            try await expectNoLeakedTasks {
                try await (0..<1_000).concurrentForEach(limit: 4) { value in
                    started.add(1)
                    if value == 3 {
                        await waitUntil { started.current >= 4 }
                        throw TestError(id: 3)
                    }
                    do {
                        try await Task.sleep(for: .seconds(3600))
                    } catch {
                        cancelled.add(1)
                        throw error
                    }
                }
            }
        }
        #expect(cancelled.current == 3)  // the three siblings running at the time
        #expect(started.current < 1_000)  // the rest never started
    }

    @Test func callerCancellation_throwsCancellationError() async throws {
        let started = Gauge()
        let task = Task {
            try await (0..<10).concurrentMap(limit: 2) { value -> Int in
                started.add(1)
                try await Task.sleep(for: .seconds(3600))
                return value
            }
        }
        await waitUntil { started.current == 2 }
        task.cancel()
        await #expect(throws: CancellationError.self) { try await task.value }
    }

    /// Transforms that ignore cancellation and return normally: the map must still throw
    /// rather than return (or crash on) elements it never transformed.
    @Test func callerCancellation_withTransformsThatReturnNormally_throwsCancellationError() async throws {
        let started = Gauge()
        let gate = AsyncSemaphore(permits: 1)
        try await gate.acquire()
        let map = Task {
            try await (0..<10).concurrentMap(limit: 2) { value -> Int in
                started.add(1)
                try? await gate.acquire()  // swallows the cancellation
                return value
            }
        }
        let forEach = Task {
            try await (0..<10).concurrentForEach(limit: 2) { _ in
                started.add(1)
                try? await gate.acquire()
            }
        }
        await waitUntil { started.current == 4 }
        map.cancel()
        forEach.cancel()
        await #expect(throws: CancellationError.self) { try await map.value }
        await #expect(throws: CancellationError.self) { try await forEach.value }
    }
}
