import Corral
import CoreMetrics
import ServiceLifecycle
import Synchronization

/// Publishes the live statistics of Corral structures through swift-metrics, with names and
/// labels that follow Prometheus conventions — a `Service` that samples every `interval`.
///
/// ```swift
/// let metrics = CorralMetrics(interval: .seconds(5))
/// metrics.register(pool)                        // corral_pool_jobs_total{pool="thumbnails",outcome="completed"} …
/// metrics.register(batcher)
/// metrics.register(pipeline: "ingest", stages: { enriched.pipelineStats })
/// metrics.register(quota, name: "api-quota")
/// let group = ServiceGroup(services: [metrics, pool.service(logger: logger)], logger: logger)
/// ```
///
/// The counters are cumulative in Corral and published as increments of the difference since
/// the last sample, so any backend (Prometheus, StatsD, OpenTelemetry) sees monotonic
/// counters. Gauges are published as their current value.
///
/// | Metric | Type | Labels |
/// |---|---|---|
/// | `corral_pool_jobs_total` | counter | `pool`, `outcome` = `completed`, `failed`, `cancelled`, `rejected`, `refused` |
/// | `corral_pool_jobs_submitted_total` | counter | `pool` |
/// | `corral_pool_queue_depth` | gauge | `pool` |
/// | `corral_pool_workers`, `corral_pool_busy_workers` | gauge | `pool` |
/// | `corral_pool_job_duration_seconds`, `corral_pool_job_wait_seconds` | timer (histogram) | `pool` (needs ``jobObserver(pool:)`` in the pool's configuration) |
/// | `corral_batcher_items_total` | counter | `batcher`, `outcome` = `handled`, `failed`, `withdrawn` |
/// | `corral_batcher_batches_total` | counter | `batcher`, `reason` = `size`, `delay`, `shutdown` |
/// | `corral_batcher_buffered_items`, `corral_batcher_in_flight_batches` | gauge | `batcher` |
/// | `corral_stage_elements_total` | counter | `pipeline`, `stage`, `event` = `received`, `emitted`, `skipped`, `retried` |
/// | `corral_stage_in_flight` | gauge | `pipeline`, `stage` |
/// | `corral_stage_wait_seconds_total` | counter (floating point) | `pipeline`, `stage`, `waiting_for` = `input`, `output` |
/// | `corral_semaphore_waiters`, `corral_semaphore_available_permits` | gauge | `semaphore` |
/// | `corral_channel_buffered`, `corral_channel_waiting_senders`, `corral_channel_waiting_receivers` | gauge | `channel` |
public final class CorralMetrics: Service, Sendable {
    /// How often ``run()`` publishes.
    public let interval: Duration
    private let factory: any MetricsFactory
    /// The registered structures' samplers. Registering never waits for a publication.
    private let sources = Mutex<[@Sendable () -> [Sample]]>([])
    /// Held for a whole publication (which calls the metrics backend), so that two never
    /// interleave their increments.
    private let publication = Mutex(Publication())

    private struct Publication: ~Copyable {
        /// The last cumulative value published per counter.
        var published: [Key: Double] = [:]
        var counters: [Key: Counter] = [:]
        var floatingCounters: [Key: FloatingPointCounter] = [:]
        var gauges: [Key: Gauge] = [:]
    }

    private struct Key: Hashable {
        var label: String
        var dimensions: [String]

        init(_ label: String, _ dimensions: [(String, String)]) {
            self.label = label
            self.dimensions = dimensions.flatMap { [$0.0, $0.1] }
        }
    }

    private struct Sample {
        enum Kind { case counter, floatingCounter, gauge }
        var kind: Kind
        var label: String
        var dimensions: [(String, String)]
        var value: Double
    }

    /// Creates a publisher that samples every `interval` once ``run()`` runs.
    ///
    /// - Parameters:
    ///   - interval: How often to publish.
    ///   - factory: The metrics backend (default: the one `MetricsSystem` was bootstrapped
    ///     with).
    /// - Precondition: `interval > .zero`.
    public init(interval: Duration = .seconds(1), factory: any MetricsFactory = MetricsSystem.factory) {
        precondition(interval > .zero, "CorralMetrics(interval:): interval must be greater than 0, got \(interval)")
        self.interval = interval
        self.factory = factory
    }

    // MARK: Registering

    /// Publishes a worker pool's jobs by outcome, queue depth and workers.
    public func register(_ pool: WorkerPool) {
        let labels = [("pool", pool.name)]
        add {
            let stats = pool.stats
            var samples: [Sample] = [
                .init(kind: .counter, label: "corral_pool_jobs_submitted_total", dimensions: labels, value: Double(stats.submitted)),
                .init(kind: .gauge, label: "corral_pool_queue_depth", dimensions: labels, value: Double(stats.queued)),
                .init(kind: .gauge, label: "corral_pool_workers", dimensions: labels, value: Double(stats.workers)),
                .init(kind: .gauge, label: "corral_pool_busy_workers", dimensions: labels, value: Double(stats.busy)),
            ]
            for (outcome, count) in [
                ("completed", stats.completed), ("failed", stats.failed), ("cancelled", stats.cancelled),
                ("rejected", stats.rejected), ("refused", stats.refused),
            ] {
                samples.append(.init(kind: .counter, label: "corral_pool_jobs_total", dimensions: labels + [("outcome", outcome)], value: Double(count)))
            }
            return samples
        }
    }

    /// Publishes a batcher's items by outcome, batches by what sent them, and what it holds.
    public func register<Item, Output, C>(_ batcher: Batcher<Item, Output, C>) {
        let labels = [("batcher", batcher.name)]
        add {
            let stats = batcher.stats
            var samples: [Sample] = [
                .init(kind: .gauge, label: "corral_batcher_buffered_items", dimensions: labels, value: Double(stats.buffered)),
                .init(kind: .gauge, label: "corral_batcher_in_flight_batches", dimensions: labels, value: Double(stats.inFlightBatches)),
            ]
            for (outcome, count) in [("handled", stats.handled), ("failed", stats.failed), ("withdrawn", stats.withdrawn)] {
                samples.append(.init(kind: .counter, label: "corral_batcher_items_total", dimensions: labels + [("outcome", outcome)], value: Double(count)))
            }
            for (reason, count) in [("size", stats.flushedBySize), ("delay", stats.flushedByDelay), ("shutdown", stats.flushedByShutdown)] {
                samples.append(.init(kind: .counter, label: "corral_batcher_batches_total", dimensions: labels + [("reason", reason)], value: Double(count)))
            }
            return samples
        }
    }

    /// Publishes each stage of a pipeline: elements by event, in flight, and time waiting.
    ///
    /// - Parameters:
    ///   - pipeline: The pipeline's name (the `pipeline` label).
    ///   - stages: Reads the stages' statistics, e.g. `{ lastStage.pipelineStats }`.
    public func register(pipeline: String, stages: @escaping @Sendable () -> [StageStats]) {
        add {
            stages().flatMap { stage -> [Sample] in
                let labels = [("pipeline", pipeline), ("stage", stage.name)]
                var samples: [Sample] = [
                    .init(kind: .gauge, label: "corral_stage_in_flight", dimensions: labels, value: Double(stage.inFlight)),
                    .init(kind: .floatingCounter, label: "corral_stage_wait_seconds_total", dimensions: labels + [("waiting_for", "input")], value: stage.waitingForInput.seconds),
                    .init(kind: .floatingCounter, label: "corral_stage_wait_seconds_total", dimensions: labels + [("waiting_for", "output")], value: stage.waitingForOutput.seconds),
                ]
                for (event, count) in [("received", stage.received), ("emitted", stage.emitted), ("skipped", stage.skipped), ("retried", stage.retried)] {
                    samples.append(.init(kind: .counter, label: "corral_stage_elements_total", dimensions: labels + [("event", event)], value: Double(count)))
                }
                return samples
            }
        }
    }

    /// Publishes a semaphore's waiters and available permits.
    public func register(_ semaphore: AsyncSemaphore, name: String) {
        let labels = [("semaphore", name)]
        add {
            [
                .init(kind: .gauge, label: "corral_semaphore_waiters", dimensions: labels, value: Double(semaphore.waiters)),
                .init(kind: .gauge, label: "corral_semaphore_available_permits", dimensions: labels, value: Double(semaphore.availablePermits)),
            ]
        }
    }

    /// Publishes a channel's buffered elements and waiting senders and receivers.
    public func register<Element>(_ channel: BoundedChannel<Element>, name: String) {
        let labels = [("channel", name)]
        add {
            [
                .init(kind: .gauge, label: "corral_channel_buffered", dimensions: labels, value: Double(channel.count)),
                .init(kind: .gauge, label: "corral_channel_waiting_senders", dimensions: labels, value: Double(channel.waitingSenders)),
                .init(kind: .gauge, label: "corral_channel_waiting_receivers", dimensions: labels, value: Double(channel.waitingReceivers)),
            ]
        }
    }

    private func add(_ source: @escaping @Sendable () -> [Sample]) {
        sources.withLock { $0.append(source) }
    }

    // MARK: Publishing

    /// Samples every registered structure now and publishes the result.
    public func publish() {
        let samplers = sources.withLock { $0 }
        let samples = samplers.flatMap { $0() }  // each structure takes its own lock
        publication.withLock { state in
            for sample in samples {
                let key = Key(sample.label, sample.dimensions)
                switch sample.kind {
                case .gauge:
                    let gauge = state.gauges[key] ?? Gauge(label: sample.label, dimensions: sample.dimensions, factory: factory)
                    state.gauges[key] = gauge
                    gauge.record(sample.value)
                case .counter:
                    let counter = state.counters[key] ?? Counter(label: sample.label, dimensions: sample.dimensions, factory: factory)
                    state.counters[key] = counter
                    let delta = sample.value - (state.published[key] ?? 0)
                    if delta > 0 { counter.increment(by: Int64(delta)) }
                    state.published[key] = Swift.max(sample.value, state.published[key] ?? 0)
                case .floatingCounter:
                    let counter = state.floatingCounters[key] ?? FloatingPointCounter(label: sample.label, dimensions: sample.dimensions, factory: factory)
                    state.floatingCounters[key] = counter
                    let delta = sample.value - (state.published[key] ?? 0)
                    if delta > 0 { counter.increment(by: delta) }
                    state.published[key] = Swift.max(sample.value, state.published[key] ?? 0)
                }
            }
        }
    }

    /// Publishes every `interval` until graceful shutdown or cancellation, then once more, so
    /// that the final counts (after the structures drained) are published.
    public func run() async throws {
        while true {
            publish()
            do {
                try await cancelWhenGracefulShutdown { [interval] in try await Task.sleep(for: interval) }
            } catch {
                break
            }
            if Task.isCancelled || Task.isShuttingDownGracefully { break }
        }
        publish()
    }

    // MARK: Job latency

    /// An observer for a pool's configuration that records each job's run time
    /// (`corral_pool_job_duration_seconds`) and time waiting in the queue
    /// (`corral_pool_job_wait_seconds`), labelled `pool`.
    public func jobObserver(pool name: String) -> any WorkerPoolObserver {
        JobTimers(pool: name, factory: factory)
    }
}

/// Records job latencies into swift-metrics timers.
private struct JobTimers: WorkerPoolObserver {
    let duration: CoreMetrics.Timer
    let wait: CoreMetrics.Timer

    init(pool: String, factory: any MetricsFactory) {
        duration = CoreMetrics.Timer(label: "corral_pool_job_duration_seconds", dimensions: [("pool", pool)], factory: factory)
        wait = CoreMetrics.Timer(label: "corral_pool_job_wait_seconds", dimensions: [("pool", pool)], factory: factory)
    }

    func jobEnded(_ job: WorkerPool.JobReport) {
        wait.recordNanoseconds(job.waited.nanosecondsClamped)
        duration.recordNanoseconds(job.ran.nanosecondsClamped)
    }
}

extension Duration {
    var seconds: Double {
        let (seconds, attoseconds) = components
        return Double(seconds) + Double(attoseconds) / 1e18
    }

    var nanosecondsClamped: Int64 {
        let (seconds, attoseconds) = components
        let (product, overflow) = seconds.multipliedReportingOverflow(by: 1_000_000_000)
        return overflow ? .max : product + attoseconds / 1_000_000_000
    }
}
