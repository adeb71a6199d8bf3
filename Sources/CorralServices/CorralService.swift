import Corral
import Logging
import ServiceLifecycle

/// A long-lived Corral structure that a ``CorralService`` can run and drain: ``WorkerPool``
/// and ``Batcher`` conform.
public protocol DrainableStructure: Sendable {
    /// The structure's kind, for logs and metrics: `"WorkerPool"`, `"Batcher"`.
    static var kind: String { get }
    /// The structure's name.
    var name: String { get }
    /// Runs the structure until it is shut down (its own `run()`).
    func run() async throws
    /// Stops accepting work and finishes what was accepted; `run()` returns when it is done.
    func beginDraining()
    /// Gives up on draining: what is left is cancelled or rejected, and `run()` returns as soon
    /// as it can. The default does nothing (the service then cancels `run()`).
    func stopImmediately()
    /// The final accounting, logged when the service stops.
    var accounting: Logger.Metadata { get }
}

extension DrainableStructure {
    public func stopImmediately() {}

    /// This structure as a `Service`; see ``CorralService``.
    ///
    /// - Parameters:
    ///   - drainTimeout: How long a graceful shutdown may drain before it escalates to an
    ///     immediate stop.
    ///   - logger: Where the service logs its escalation and final accounting.
    public func service(drainTimeout: Duration = .seconds(30), logger: Logger) -> CorralService<Self> {
        CorralService(self, drainTimeout: drainTimeout, logger: logger)
    }
}

/// Runs a Corral structure as a swift-service-lifecycle `Service`: in a `ServiceGroup`, a
/// graceful shutdown (SIGTERM, SIGINT) drains it — no new work, everything accepted finishes
/// — within `drainTimeout`, then escalates to an immediate stop; the final accounting is
/// logged.
///
/// ```swift
/// let pool = WorkerPool(.init(workers: .fixed(8), queueCapacity: 256, name: "thumbnails"))
/// let group = ServiceGroup(configuration: .init(
///     services: [pool.service(drainTimeout: .seconds(20), logger: logger), httpServer],
///     gracefulShutdownSignals: [.sigterm, .sigint],
///     logger: logger
/// ))
/// try await group.run()
/// ```
///
/// Why an adapter rather than a conformance of `WorkerPool` itself: a `Service`'s `run()` must
/// react to graceful shutdown, which is a swift-service-lifecycle task-local signal; Corral's
/// structures do not depend on that package, and a bare conformance would make SIGTERM wait
/// for a pool that never learns it should drain.
///
/// ## Shutdown
/// - Graceful shutdown: the structure drains (``DrainableStructure/beginDraining()``). If it
///   has not finished after `drainTimeout`, the service logs a warning and stops it at once
///   (``DrainableStructure/stopImmediately()`` and cancellation of its `run()`).
/// - Cancellation of the service's task (the group's own escalation): the structure's `run()`
///   is cancelled, which stops it immediately.
/// - Either way, `run()` returns only when the structure's `run()` has returned: nothing of it
///   outlives the service.
public struct CorralService<Structure: DrainableStructure>: Service, CustomStringConvertible {
    /// The structure this service runs.
    public let structure: Structure
    /// How long a graceful shutdown may take before it becomes immediate.
    public let drainTimeout: Duration
    /// Where the service logs its start, drain, escalation and final accounting.
    public let logger: Logger

    /// Creates a service running `structure`.
    ///
    /// - Precondition: `drainTimeout >= .zero`.
    public init(_ structure: Structure, drainTimeout: Duration = .seconds(30), logger: Logger) {
        precondition(drainTimeout >= .zero, "CorralService(drainTimeout:): drainTimeout must not be negative, got \(drainTimeout)")
        self.structure = structure
        self.drainTimeout = drainTimeout
        var logger = logger
        logger[metadataKey: "corral.kind"] = "\(Structure.kind)"
        logger[metadataKey: "corral.name"] = "\(structure.name)"
        self.logger = logger
    }

    /// `"WorkerPool \"thumbnails\""`.
    public var description: String { "\(Structure.kind) \"\(structure.name)\"" }

    private enum Event: Sendable {
        case finished(Result<Void, any Error>)
        case drainTimedOut
        case watcherCancelled
    }

    /// Runs the structure until it has drained after a graceful shutdown, was stopped, or
    /// ended on its own.
    ///
    /// - Throws: What the structure's `run()` throws (`CancellationError` when the service's
    ///   task was cancelled; not when the drain deadline stopped it, which is a normal end).
    public func run() async throws {
        logger.info("started")
        let structure = self.structure
        let drainTimeout = self.drainTimeout
        let logger = self.logger
        let result: Result<Void, any Error> = await withTaskGroup(of: Event.self) { group in
            group.addTask {
                do {
                    try await structure.run()
                    return .finished(.success(()))
                } catch {
                    return .finished(.failure(error))
                }
            }
            group.addTask {
                // Throws when cancelled: the structure ended first, or the service's task was
                // cancelled (then the structure's run() is cancelled too).
                do {
                    try await gracefulShutdown()
                    logger.info("graceful shutdown: draining", metadata: ["corral.drainTimeout": "\(drainTimeout)"])
                    structure.beginDraining()
                    try await Task.sleep(for: drainTimeout)
                    return .drainTimedOut
                } catch {
                    return .watcherCancelled
                }
            }
            var outcome: Result<Void, any Error>?
            var escalated = false
            while let event = await group.next() {
                switch event {
                case .finished(.failure(let error)) where escalated && error is CancellationError:
                    // Stopped by the escalation, as asked: not a failure of the service.
                    outcome = .success(())
                case .finished(let result):
                    outcome = result
                    group.cancelAll()  // the drain watcher
                case .watcherCancelled:
                    break  // the structure ended, or the service's task was cancelled
                case .drainTimedOut:
                    logger.warning("drain deadline passed: stopping immediately")
                    escalated = true
                    structure.stopImmediately()
                    group.cancelAll()
                }
            }
            return outcome ?? .success(())
        }
        var metadata = structure.accounting
        switch result {
        case .success:
            logger.info("stopped", metadata: metadata)
        case .failure(let error) where error is CancellationError && Task.isCancelled:
            // The service's task was cancelled (the group's own escalation): expected, not a
            // failure of the structure.
            logger.warning("stopped: cancelled", metadata: metadata)
        case .failure(let error):
            metadata["corral.error"] = "\(error)"
            logger.error("stopped with an error", metadata: metadata)
        }
        try result.get()
    }
}

// MARK: - Conformances

extension WorkerPool: DrainableStructure {
    public static var kind: String { "WorkerPool" }

    public func beginDraining() {
        shutdown(.graceful)
    }

    public func stopImmediately() {
        shutdown(.immediate)
    }

    /// Jobs by outcome, refusals and peaks.
    public var accounting: Logger.Metadata {
        let stats = self.stats
        return [
            "corral.jobs.submitted": "\(stats.submitted)",
            "corral.jobs.completed": "\(stats.completed)",
            "corral.jobs.failed": "\(stats.failed)",
            "corral.jobs.cancelled": "\(stats.cancelled)",
            "corral.jobs.rejected": "\(stats.rejected)",
            "corral.jobs.refused": "\(stats.refused)",
            "corral.jobs.unfinished": "\(stats.unfinished)",
            "corral.peak.busy": "\(stats.peakBusy)",
            "corral.peak.queued": "\(stats.peakQueued)",
        ]
    }
}

extension Batcher: DrainableStructure {
    public static var kind: String { "Batcher" }

    public func beginDraining() {
        shutdown()
    }

    /// Items by outcome and batches by what sent them.
    public var accounting: Logger.Metadata {
        let stats = self.stats
        return [
            "corral.items.submitted": "\(stats.submitted)",
            "corral.items.handled": "\(stats.handled)",
            "corral.items.failed": "\(stats.failed)",
            "corral.items.withdrawn": "\(stats.withdrawn)",
            "corral.items.unfinished": "\(stats.unfinished)",
            "corral.batches": "\(stats.batches)",
            "corral.batches.bySize": "\(stats.flushedBySize)",
            "corral.batches.byDelay": "\(stats.flushedByDelay)",
            "corral.batches.byShutdown": "\(stats.flushedByShutdown)",
        ]
    }
}
