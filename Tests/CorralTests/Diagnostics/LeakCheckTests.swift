@testable import Corral
import CorralTesting
import Testing

@Suite("Leak checking")
struct LeakCheckTests {
    /// Without the checker this test would pass silently while a task kept running.
    @Test func aTaskStillRunningAfterTheScope_isReported_withItsStructure() async throws {
        let tracker = TaskTracker(name: "leaky", limit: 1)
        let gate = AsyncSemaphore(permits: 1)
        try await gate.acquire()
        try await withKnownIssue {
            try await expectNoLeakedTasks(settle: .milliseconds(20)) {
                try await tracker.spawn { try await gate.acquire(); gate.release() }
            }
        } matching: { issue in
            "\(issue)".contains("TaskTracker \"leaky\" still has 1 live task")
        }
        gate.release()
        tracker.close()
        try await tracker.wait()
    }

    @Test func aTaskThatFinishesDuringTheSettlePeriod_isNotALeak() async throws {
        let tracker = TaskTracker(name: "quick", limit: 1)
        try await expectNoLeakedTasks {
            try await tracker.spawn { await Task.yield() }
        }
        tracker.close()
        try await tracker.wait()
    }

    @Test func scopes_countOnlyTheirOwnTasks_soParallelTestsDoNotInterfere() async throws {
        let gate = AsyncSemaphore(permits: 1)
        try await gate.acquire()
        let outer = TaskLedger()
        let inner = TaskLedger()
        let tracker = TaskTracker(name: "shared", limit: 4)
        try await TaskLedger.$current.withValue(outer) {
            try await tracker.spawn { try await gate.acquire(); gate.release() }
            try await TaskLedger.$current.withValue(inner) {
                try await tracker.spawn {}
            }
        }
        await waitUntil { inner.liveTaskCount == 0 }
        #expect(outer.liveTasks == [TaskLedger.Owner(kind: "TaskTracker", name: "shared"): 1])
        gate.release()
        tracker.close()
        try await tracker.wait()
        #expect(outer.liveTaskCount == 0)
    }

    @Test func deadlineBodies_errorGroupsAndMaps_areAccountedFor() async throws {
        let ledger = TaskLedger()
        let seenLive = Gauge()
        try await TaskLedger.$current.withValue(ledger) {
            try await withTimeout(.seconds(60)) { seenLive.add(ledger.liveTaskCount) }
            try await withErrorGroup(limit: 2) { group in
                try await group.addTask { seenLive.add(ledger.liveTaskCount) }
            }
            _ = try await [1].concurrentMap(limit: 1) { value in seenLive.add(ledger.liveTaskCount); return value }
        }
        #expect(seenLive.current == 3)  // each body saw exactly its own task live
        #expect(ledger.liveTaskCount == 0)
    }
}
