@testable import Corral
import Testing

@Suite("ObjectPool")
struct ObjectPoolTests {
    @Test func borrowedObjectsAreReused_andResetOnTheWayBack() {
        let made = Gauge()
        let pool = ObjectPool(capacity: 2) {
            made.add(1)
            return [Int]()
        } reset: {
            $0.removeAll(keepingCapacity: true)
        }
        pool.withObject { $0.append(contentsOf: [1, 2, 3]) }
        let seen = pool.withObject { buffer in
            buffer  // reused and reset: empty
        }
        #expect(seen.isEmpty)
        #expect(made.current == 1)
        #expect(pool.stats.hits == 1 && pool.stats.misses == 1 && pool.stats.inUse == 0 && pool.stats.kept == 1)
    }

    @Test func anEmptyPool_makesObjects_andCapacityBoundsWhatIsKept() {
        let pool = ObjectPool(capacity: 2) { [UInt8](repeating: 0, count: 16) }
        func holdNested(_ depth: Int) {
            guard depth > 0 else {
                #expect(pool.stats.inUse == 5)
                #expect(pool.stats.misses == 5)
                return
            }
            pool.withObject { _ in holdNested(depth - 1) }
        }
        holdNested(5)  // five borrowed at once, then returned as each scope ends
        #expect(pool.stats.inUse == 0)
        #expect(pool.stats.kept == 2)
        #expect(pool.stats.dropped == 3)
    }

    @Test func theObjectIsReturned_whenTheBodyThrows() {
        let pool = ObjectPool(capacity: 4) { 0 }
        #expect(throws: TestError.self) {
            try pool.withObject { (_: inout Int) throws(TestError) in throw TestError() }
        }
        #expect(pool.stats.inUse == 0)
        #expect(pool.stats.kept == 1)
    }

    @Test func theObjectIsReturned_whenAnAsyncBodyIsCancelled() async throws {
        let pool = ObjectPool(capacity: 4) { "buffer" }
        let started = AsyncSemaphore(permits: 1)
        try await started.acquire()
        let task = Task {
            try await pool.withObject { _ in
                started.release()
                try await Task.sleep(for: .seconds(3600))
            }
        }
        try await started.acquire()
        #expect(pool.stats.inUse == 1)
        task.cancel()
        await #expect(throws: CancellationError.self) { try await task.value }
        #expect(pool.stats.inUse == 0)
        #expect(pool.stats.kept == 1)
    }

    @Test func aLease_isReturnedOnRelease_orAtTheEndOfItsScope() {
        let pool = ObjectPool(capacity: 4) { [String]() } reset: { $0.removeAll() }
        do {
            var lease = pool.lease()
            lease.object.append("held across calls")
            #expect(pool.stats.inUse == 1)
        }
        #expect(pool.stats.inUse == 0)
        let lease = pool.lease()
        #expect(lease.object.isEmpty)  // reset before reuse
        lease.release()
        #expect(pool.stats.inUse == 0)
        #expect(pool.stats.hits == 1)
    }

    @Test func concurrentBorrowers_neverShareAnObject() async throws {
        final class Token: Sendable {
            let id: Int
            init(id: Int) { self.id = id }
        }
        let lastID = LockedState(0)
        let pool = ObjectPool(capacity: 8) {
            // One step: two makes at once must not read the same count (a false "overlap").
            Token(id: lastID.withLock { id in
                id += 1
                return id
            })
        }
        let holders = Log<Int>()
        let overlaps = Gauge()
        let inUse = LockedState<Set<Int>>([])
        try await withErrorGroup(limit: 16) { group in
            for _ in 0..<2_000 {
                try await group.addTask {
                    await pool.withObject { token in
                        let fresh = inUse.withLock { $0.insert(token.id).inserted }
                        if !fresh { overlaps.add(1) }
                        holders.append(token.id)
                        await Task.yield()
                        inUse.withLock { _ = $0.remove(token.id) }
                    }
                }
            }
        }
        #expect(overlaps.current == 0)
        #expect(pool.stats.inUse == 0)
        #expect(pool.stats.hits + pool.stats.misses == 2_000)
        #expect(pool.stats.kept <= 8)
    }
}
