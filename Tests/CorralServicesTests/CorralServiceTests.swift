import Corral
import CorralServices
import CorralTesting
import Logging
import ServiceLifecycle
import ServiceLifecycleTestKit
import Synchronization
import Testing

/// Log records kept in memory.
final class LogRecords: Sendable {
    struct Record: Sendable {
        var level: Logger.Level
        var message: String
        var metadata: Logger.Metadata
    }

    private let records = Mutex<[Record]>([])

    func append(_ record: Record) {
        records.withLock { $0.append(record) }
    }

    var all: [Record] { records.withLock { $0 } }

    func first(_ message: String) -> Record? {
        all.first { $0.message == message }
    }
}

/// A log handler that keeps every record in a `LogRecords`.
struct CapturingLogHandler: LogHandler {
    let records: LogRecords
    var metadata: Logger.Metadata = [:]
    var metadataProvider: Logger.MetadataProvider?
    var logLevel: Logger.Level = .trace

    func log(event: LogEvent) {
        records.append(.init(level: event.level, message: "\(event.message)", metadata: metadata.merging(event.metadata ?? [:]) { $1 }))
    }

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }
}

func capturingLogger() -> (Logger, LogRecords) {
    let records = LogRecords()
    return (Logger(label: "test") { _ in CapturingLogHandler(records: records) }, records)
}

/// A semaphore whose one permit is taken: `acquire()` waits until released or cancelled.
func closedGate() async throws -> AsyncSemaphore {
    let gate = AsyncSemaphore(permits: 1)
    try await gate.acquire()
    return gate
}

@Suite("CorralService")
struct CorralServiceTests {
    @Test func gracefulShutdown_drainsThePool_andLogsTheAccounting() async throws {
        let (logger, records) = capturingLogger()
        let pool = WorkerPool(.init(workers: .fixed(2), queueCapacity: 16, name: "thumbnails"))
        var handles: [JobHandle<Int>] = []
        for job in 0..<10 {
            handles.append(try await pool.submit { job * 2 })  // queued: run() has not started
        }
        try await testGracefulShutdown { trigger in
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask { try await pool.service(drainTimeout: .seconds(3600), logger: logger).run() }
                trigger.triggerGracefulShutdown()
                try await group.waitForAll()
            }
        }
        for (job, handle) in handles.enumerated() {
            #expect(try await handle.value == job * 2, "a queued job was lost in the drain")
        }
        let stats = pool.stats
        #expect(stats.completed == 10 && stats.unfinished == 0)
        let stopped = try #require(records.first("stopped"))
        #expect(stopped.level == .info)
        #expect(stopped.metadata["corral.jobs.completed"] == "10")
        #expect(stopped.metadata["corral.name"] == "thumbnails")
        #expect(stopped.metadata["corral.kind"] == "WorkerPool")
        #expect(records.first("graceful shutdown: draining") != nil)
        #expect(records.first("drain deadline passed: stopping immediately") == nil)
    }

    @Test func drainDeadline_escalatesToAnImmediateStop() async throws {
        let (logger, records) = capturingLogger()
        let pool = WorkerPool(.init(workers: .fixed(1), queueCapacity: 4, name: "stuck"))
        let gate = try await closedGate()
        let started = Gauge()
        let stuck = try await pool.submit {
            started.add(1)
            try await gate.acquire()  // waits until cancelled
        }
        let queued = try await pool.submit { 1 }
        try await testGracefulShutdown { trigger in
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask { try await pool.service(drainTimeout: .milliseconds(20), logger: logger).run() }
                await waitUntil("the stuck job started") { started.current == 1 }
                trigger.triggerGracefulShutdown()
                try await group.waitForAll()
            }
        }
        await #expect(throws: CancellationError.self) { try await stuck.value }
        // Graceful first: the queued job ran before the deadline, or was rejected by the
        // escalation; either way it is accounted for.
        _ = try? await queued.value
        let stats = pool.stats
        #expect(stats.cancelled == 1)
        #expect(stats.unfinished == 0)
        let warning = try #require(records.first("drain deadline passed: stopping immediately"))
        #expect(warning.level == .warning)
        #expect(records.first("stopped") != nil)
    }

    @Test func cancellingTheService_stopsTheStructure_andRethrows() async throws {
        let (logger, records) = capturingLogger()
        let pool = WorkerPool(.init(workers: .fixed(1), queueCapacity: 4, name: "cancelled"))
        let service = Task { try await pool.service(logger: logger).run() }
        await waitUntil("started") { records.first("started") != nil }
        service.cancel()
        await #expect(throws: CancellationError.self) { try await service.value }
        #expect(try #require(records.first("stopped: cancelled")).level == .warning)
    }

    @Test func batcherService_flushesWhatIsBuffered() async throws {
        let (logger, records) = capturingLogger()
        let batcher = Batcher<Int, Int, ContinuousClock>(maxSize: 100, maxDelay: .seconds(3600), name: "rows") { $0.map { $0 + 1 } }
        let tickets = try (0..<5).map { try batcher.enqueue($0) }
        try await testGracefulShutdown { trigger in
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask { try await batcher.service(logger: logger).run() }
                trigger.triggerGracefulShutdown()
                try await group.waitForAll()
            }
        }
        for (item, ticket) in tickets.enumerated() {
            #expect(try await ticket.value == item + 1)
        }
        let stopped = try #require(records.first("stopped"))
        #expect(stopped.metadata["corral.items.handled"] == "5")
        #expect(stopped.metadata["corral.batches.byShutdown"] == "1")
    }

    @Test func inAServiceGroup_aGracefulShutdownDrainsEveryStructure() async throws {
        let (logger, _) = capturingLogger()
        let pool = WorkerPool(.init(workers: .fixed(2), queueCapacity: 8, name: "jobs"))
        let batcher = Batcher<Int, Int, ContinuousClock>(maxSize: 10, maxDelay: .seconds(3600), name: "results") { $0 }
        let handles = try await (0..<6).asyncMap { job in try await pool.submit { job } }
        let tickets = try (0..<3).map { try batcher.enqueue($0) }
        let group = ServiceGroup(configuration: .init(
            services: [.init(service: pool.service(logger: logger)), .init(service: batcher.service(logger: logger))],
            logger: logger
        ))
        try await withThrowingTaskGroup(of: Void.self) { tasks in
            tasks.addTask { try await group.run() }
            await group.triggerGracefulShutdown()
            try await tasks.waitForAll()
        }
        for (job, handle) in handles.enumerated() { #expect(try await handle.value == job) }
        for (item, ticket) in tickets.enumerated() { #expect(try await ticket.value == item) }
        #expect(pool.stats.completed == 6)
        #expect(batcher.stats.handled == 3)
    }
}

extension Sequence where Element: Sendable {
    func asyncMap<T>(_ transform: (Element) async throws -> T) async rethrows -> [T] {
        var results: [T] = []
        for element in self { results.append(try await transform(element)) }
        return results
    }
}

/// Yields until `condition` holds (see CorralTests' `waitUntil`).
func waitUntil(_ what: String, _ condition: () -> Bool) async {
    for _ in 0..<5_000_000 {
        if condition() { return }
        await Task.yield()
    }
    Issue.record("waitUntil: \(what) never became true")
}

/// A counter shared between tasks.
final class Gauge: Sendable {
    private let value = Mutex(0)
    func add(_ delta: Int) { value.withLock { $0 += delta } }
    var current: Int { value.withLock { $0 } }
}
