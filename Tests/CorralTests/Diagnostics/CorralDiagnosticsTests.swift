@testable import Corral
import CorralTesting
import Foundation
import Testing

/// The registry is process-wide and tests run in parallel: each test looks only at the
/// structures it named.
@Suite("CorralDiagnostics")
struct CorralDiagnosticsTests {
    private func structures(named name: String) -> [StructureSnapshot] {
        CorralDiagnostics.snapshot().structures.filter { $0.name == name || $0.name.hasPrefix(name + "/") }
    }

    @Test func poolsAreTrackedFromCreation_untilDeallocated() async throws {
        var pool: WorkerPool? = WorkerPool(.init(workers: .fixed(3), queueCapacity: 8, name: "diag-pool"))
        let found = try #require(structures(named: "diag-pool").first)
        #expect(found.kind == "WorkerPool")
        #expect(found.details["queued"] == 0)
        #expect(found.stalledFor == nil)
        _ = pool
        pool = nil
        #expect(structures(named: "diag-pool").isEmpty, "the registry kept a deallocated pool")
    }

    @Test func semaphoreWhoseHeadIsNotServed_isStalled_untilItIs() async throws {
        let semaphore = AsyncSemaphore(permits: 1)
        CorralDiagnostics.track(semaphore, name: "diag-semaphore")
        try await semaphore.acquire()
        let waiter = Task { try await semaphore.acquire() }
        await waitUntil("the waiter parked") { semaphore.waiters == 1 }

        let first = try #require(structures(named: "diag-semaphore").first)
        #expect(first.waiting == 1)
        let second = try #require(structures(named: "diag-semaphore").first)
        #expect(second.stalledFor != nil, "the head was not served between two snapshots")

        semaphore.release()
        try await waiter.value
        let after = try #require(structures(named: "diag-semaphore").first)
        #expect(after.waiting == 0 && after.stalledFor == nil)
        semaphore.release()
    }

    @Test func channelWithABlockedSender_isStalled() async throws {
        let channel = BoundedChannel<Int>(capacity: 1)
        CorralDiagnostics.track(channel, name: "diag-channel")
        try await channel.send(1)
        let sender = Task { try await channel.send(2) }
        await waitUntil("the sender parked") { channel.waitingSenders == 1 }
        _ = structures(named: "diag-channel")
        let stalled = try #require(structures(named: "diag-channel").first)
        #expect(stalled.stalledFor != nil)
        #expect(stalled.held == 1 && stalled.details["waitingSenders"] == 1)
        _ = try await channel.receive()
        try await sender.value
        #expect(try #require(structures(named: "diag-channel").first).stalledFor == nil)
    }

    @Test func pipelineStages_areListed() async throws {
        let pipeline = Counting(range: 0..<10)
            .stage("parse") { $0 }
            .stage("double") { $0 * 2 }
        CorralDiagnostics.track(pipeline: "diag-pipeline", pipeline)
        for try await _ in pipeline {}
        let stages = structures(named: "diag-pipeline")
        #expect(stages.map(\.name) == ["diag-pipeline/double", "diag-pipeline/parse"])
        #expect(stages.allSatisfy { $0.kind == "PipelineStage" && $0.progress == 10 && $0.waiting == 0 })
    }

    @Test func snapshot_rendersATable_andRoundTripsThroughJSON() async throws {
        let batcher = Batcher<Int, Int, ContinuousClock>(maxSize: 4, maxDelay: .seconds(1), name: "diag-batcher") { $0 }
        _ = try batcher.enqueue(1)
        let snapshot = DiagnosticsSnapshot(structures: structures(named: "diag-batcher"))
        #expect(snapshot.structures.count == 1)
        let lines = snapshot.table.split(separator: "\n")
        #expect(lines.count == 2)
        #expect(lines[0].hasPrefix("kind"))
        #expect(lines[1].contains("Batcher") && lines[1].contains("diag-batcher"))
        let decoded = try JSONDecoder().decode(DiagnosticsSnapshot.self, from: JSONEncoder().encode(snapshot))
        #expect(decoded == snapshot)
        batcher.shutdown()
        try await batcher.run()
    }

    @Test func detectStalls_reportsAStallOnce() async throws {
        let semaphore = AsyncSemaphore(permits: 1)
        CorralDiagnostics.track(semaphore, name: "diag-stall")
        try await semaphore.acquire()
        let waiter = Task { try await semaphore.acquire() }
        await waitUntil("the waiter parked") { semaphore.waiters == 1 }
        let reports = Log<String>()
        let detector = Task {
            await CorralDiagnostics.detectStalls(threshold: .zero, every: .milliseconds(1)) { structure in
                if structure.name == "diag-stall" { reports.append(structure.name) }
            }
        }
        await waitUntil("the stall was reported") { reports.count >= 1 }
        // Several more rounds: still one report for the same stall.
        for _ in 0..<20 { try await Task.sleep(for: .milliseconds(1)) }
        #expect(reports.count == 1)
        detector.cancel()
        await detector.value
        semaphore.release()
        try await waiter.value
        semaphore.release()
    }

    @Test func aPoolWhoseBatchedJobsFinish_showsProgress_andCountsWhatWaits() async throws {
        // One worker takes the 4 queued jobs as one batch, whose ends are published when the
        // batch is reported. Snapshots must follow the jobs anyway: two that finished are
        // progress (not a stall), and the ones not started yet are waiting.
        let pool = WorkerPool(.init(workers: .fixed(1), queueCapacity: 16, name: "diagnostics-batched"))
        let gate = AsyncSemaphore(permits: 4)
        try await gate.acquire(4)
        let started = Gauge()
        for _ in 0..<4 {
            _ = try await pool.submit { started.add(1); try await gate.acquire() }
        }
        let run = Task { try await pool.run() }
        await waitUntil("job 1 started") { started.current == 1 }
        let first = try #require(CorralDiagnostics.snapshot().structures.first { $0.name == "diagnostics-batched" })
        gate.release()
        await waitUntil("job 2 started") { started.current == 2 }
        gate.release()
        await waitUntil("job 3 started") { started.current == 3 }
        let second = try #require(CorralDiagnostics.snapshot().structures.first { $0.name == "diagnostics-batched" })
        #expect(first.held == 3, "3 jobs wait for the worker")
        #expect(pool.stats.completed == 2)
        #expect(second.progress == 2)  // (its stall clock restarted then too; other tests' snapshots may have seen it first)
        gate.release(2)
        pool.shutdown()
        try await run.value
    }

    @Test func stallReporter_reportsEachStallOnce_includingOneWhoseProgressAnotherCallerSaw() {
        // Stall clocks are shared by every caller of snapshot(): a detector may never see the
        // structure unstalled between two stalls, only its stalledFor going down.
        var reporter = StallReporter(threshold: .seconds(1))
        func snapshot(stalledFor: Duration?) -> DiagnosticsSnapshot {
            DiagnosticsSnapshot(structures: [StructureSnapshot(
                kind: "AsyncSemaphore", name: "quota", id: 1, tasks: nil, waiting: 1, held: nil,
                progress: nil, stalledFor: stalledFor, details: [:])])
        }
        #expect(reporter.newStalls(in: snapshot(stalledFor: .milliseconds(500))).isEmpty)  // below the threshold
        #expect(reporter.newStalls(in: snapshot(stalledFor: .seconds(2))).count == 1)  // a stall: reported
        #expect(reporter.newStalls(in: snapshot(stalledFor: .seconds(3))).isEmpty)  // the same stall
        #expect(reporter.newStalls(in: snapshot(stalledFor: .milliseconds(1_500))).count == 1)  // progress, then a new stall
        #expect(reporter.newStalls(in: snapshot(stalledFor: nil)).isEmpty)  // progress
        #expect(reporter.newStalls(in: snapshot(stalledFor: .seconds(1))).count == 1)  // stalled anew
    }

    /// Two stages of one pipeline with the same name share one stall watch: both are blocked,
    /// only one is ever seen stalled.
    @Test func pipelineStagesWithTheSameName_areBothSeenStalled() async throws {
        let first = AsyncSemaphore(permits: 1)
        let second = AsyncSemaphore(permits: 1)
        try await first.acquire()
        try await second.acquire()
        let pipeline = Counting(range: 0..<4)
            .stage("step") { value in if value >= 1 { try await first.acquire() }; return value }
            .stage("step") { value in try await second.acquire(); return value }
        CorralDiagnostics.track(pipeline: "twin-stages", pipeline)
        let consumer = Task { for try await _ in pipeline {} }
        await waitUntil("both stages hold an element") {
            pipeline.pipelineStats.allSatisfy { $0.inFlight > 0 } && first.waiters == 1 && second.waiters == 1
        }
        _ = CorralDiagnostics.snapshot()
        let stages = CorralDiagnostics.snapshot().structures.filter { $0.name.hasPrefix("twin-stages/step") }
        consumer.cancel()
        _ = try? await consumer.value
        #expect(stages.map(\.name) == ["twin-stages/step", "twin-stages/step#2"])  // told apart
        #expect(stages.count == 2 && stages.allSatisfy { $0.waiting > 0 })
        #expect(stages.filter { $0.stalledFor != nil }.count == 2, "both stages are blocked")
    }

    /// Two structures that share kind, name and id (same-named stages) are two stalls.
    @Test func stallReporter_twinStages_eachStallReportedOnce() {
        var reporter = StallReporter(threshold: .seconds(1))
        func snapshot(_ a: Duration, _ b: Duration) -> DiagnosticsSnapshot {
            DiagnosticsSnapshot(structures: [a, b].map {
                StructureSnapshot(kind: "Stage", name: "twin/step", id: 7, tasks: nil, waiting: 1, held: nil,
                                  progress: nil, stalledFor: $0, details: [:])
            })
        }
        #expect(reporter.newStalls(in: snapshot(.seconds(2), .seconds(10))).count == 2)
        #expect(reporter.newStalls(in: snapshot(.seconds(3), .seconds(11))).isEmpty, "the same two stalls")
    }
}
