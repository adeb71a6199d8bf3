import Corral
import CoreMetrics
import ServiceLifecycle

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
/// counters. Gauges are published as their current value. Structures that share a name
/// share their metrics: counters add up, gauges are summed. Registered structures are held
/// weakly: one that is deallocated stops being published.
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
    /// The registered structures' samplers, by registration id; a sampler returns nil once its
    /// structure is gone (structures are held weakly). Registering never waits for a
    /// publication.
    private let sources = LockedState<(nextID: Int, samplers: [(id: Int, sample: @Sendable () -> [Sample]?)])>((0, []))
    /// Held for a whole publication (which calls the metrics backend), so that two never
    /// interleave their increments.
    private let publication = LockedState(Publication())

    private struct SourceKey: Hashable {
        var source: Int
        var key: Key
    }

    private struct Publication {
        /// The last cumulative value published per structure and counter: structures that
        /// share a name add up in the counter they share.
        var published: [SourceKey: Double] = [:]
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
        add { [weak pool] in
            guard let pool else { return nil }
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
        add { [weak batcher] in
            guard let batcher else { return nil }
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
    ///   - stages: Reads the stages' statistics, e.g. `{ lastStage.pipelineStats }`. It is
    ///     kept (with what it captures) as long as this publisher.
    public func register(pipeline: String, stages: @escaping @Sendable () -> [StageStats]) {
        add {
            stages().flatMap { stage -> [Sample] in
                let labels = [("pipeline", pipeline), ("stage", stage.name)]
                var samples: [Sample] = [
                    .init(kind: .gauge, label: "corral_stage_in_flight", dimensions: labels, value: Double(stage.inFlight)),
                    .init(kind: .floatingCounter, label: "corral_stage_wait_seconds_total", dimensions: labels + [("waiting_for", "input")], value: Double(stage.waitingForInput.nanoseconds) / 1e9),
                    .init(kind: .floatingCounter, label: "corral_stage_wait_seconds_total", dimensions: labels + [("waiting_for", "output")], value: Double(stage.waitingForOutput.nanoseconds) / 1e9),
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
        add { [weak semaphore] in
            guard let semaphore else { return nil }
            return [
                .init(kind: .gauge, label: "corral_semaphore_waiters", dimensions: labels, value: Double(semaphore.waiters)),
                .init(kind: .gauge, label: "corral_semaphore_available_permits", dimensions: labels, value: Double(semaphore.availablePermits)),
            ]
        }
    }

    /// Publishes a channel's buffered elements and waiting senders and receivers.
    public func register<Element>(_ channel: BoundedChannel<Element>, name: String) {
        let labels = [("channel", name)]
        add { [weak channel] in
            guard let channel else { return nil }
            return [
                .init(kind: .gauge, label: "corral_channel_buffered", dimensions: labels, value: Double(channel.count)),
                .init(kind: .gauge, label: "corral_channel_waiting_senders", dimensions: labels, value: Double(channel.waitingSenders)),
                .init(kind: .gauge, label: "corral_channel_waiting_receivers", dimensions: labels, value: Double(channel.waitingReceivers)),
            ]
        }
    }

    private func add(_ sample: @escaping @Sendable () -> [Sample]?) {
        sources.withLock { sources in
            sources.nextID += 1
            sources.samplers.append((sources.nextID, sample))
        }
    }

    // MARK: Publishing

    /// Samples every registered structure now and publishes the result.
    public func publish() {
        let samplers = sources.withLock { $0.samplers }
        var samples: [(source: Int, sample: Sample)] = []
        var gone: Set<Int> = []
        for sampler in samplers {  // each structure takes its own lock
            guard let taken = sampler.sample() else {
                gone.insert(sampler.id)
                continue
            }
            samples += taken.map { (sampler.id, $0) }
        }
        if !gone.isEmpty {
            sources.withLock { $0.samplers.removeAll { gone.contains($0.id) } }
        }
        publication.withLock { state in
            // Structures that share a name share a metric: add their gauges up, and their
            // counters' increments.
            var gauges: [Key: (dimensions: [(String, String)], label: String, value: Double)] = [:]
            // A counter's total per source first: one source may report several structures
            // under one name (two stages of a pipeline that share a name).
            var totals: [SourceKey: (sample: Sample, value: Double)] = [:]
            for (source, sample) in samples {
                let key = Key(sample.label, sample.dimensions)
                switch sample.kind {
                case .gauge:
                    gauges[key, default: (sample.dimensions, sample.label, 0)].value += sample.value
                case .counter, .floatingCounter:
                    totals[SourceKey(source: source, key: key), default: (sample, 0)].value += sample.value
                }
            }
            var increments: [Key: (sample: Sample, delta: Double)] = [:]
            for (sourceKey, total) in totals {
                let delta = total.value - (state.published[sourceKey] ?? 0)
                state.published[sourceKey] = Swift.max(total.value, state.published[sourceKey] ?? 0)
                increments[sourceKey.key, default: (total.sample, 0)].delta += Swift.max(0, delta)
            }
            for (key, gauge) in gauges {
                let metric = state.gauges[key] ?? Gauge(label: gauge.label, dimensions: gauge.dimensions, factory: factory)
                state.gauges[key] = metric
                metric.record(gauge.value)
            }
            // A gauge no live structure reports any more (they were all deallocated) drops to
            // 0 once, rather than showing their last value for ever.
            for (key, metric) in state.gauges where gauges[key] == nil {
                metric.record(0)
                state.gauges[key] = nil
            }
            for (key, increment) in increments where increment.delta > 0 {
                let sample = increment.sample
                if sample.kind == .counter {
                    let counter = state.counters[key] ?? Counter(label: sample.label, dimensions: sample.dimensions, factory: factory)
                    state.counters[key] = counter
                    counter.increment(by: Int64(increment.delta))
                } else {
                    let counter = state.floatingCounters[key] ?? FloatingPointCounter(label: sample.label, dimensions: sample.dimensions, factory: factory)
                    state.floatingCounters[key] = counter
                    counter.increment(by: increment.delta)
                }
            }
            for sourceKey in state.published.keys where gone.contains(sourceKey.source) {
                state.published[sourceKey] = nil
            }
        }
    }

    /// Publishes every `interval` until graceful shutdown or cancellation, then once more.
    ///
    /// List it *first* in a `ServiceGroup`: the group shuts its services down in reverse
    /// order, so its last publication then comes after the other services have drained, and
    /// carries their final counts. When the group's shutdown deadline passes, though, the
    /// group cancels every service at once, and this last publication may come before the
    /// others have counted the jobs they stopped: call ``publish()`` once more after the
    /// group's `run()` returns.
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
        wait.recordNanoseconds(Int64(job.waited.nanoseconds))
        duration.recordNanoseconds(Int64(job.ran.nanoseconds))
    }
}
