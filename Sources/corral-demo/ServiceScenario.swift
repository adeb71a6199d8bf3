import ArgumentParser
import Corral
import CorralServices
import Logging
import ServiceLifecycle
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The production job service — the seed's Pattern 7 — built from Corral's structures and run
/// as swift-service-lifecycle services in one `ServiceGroup`:
///
///     generator ─▶ validate ─▶ enrich ─▶ transform ─▶ WorkerPool ─▶ Batcher ─▶ JSON Lines file
///                              │ rate limiter, weighted quota (light 1, heavy 5 of 20),
///                              │ a timeout per call, 3 tries, then skip
///                              ▼
///                         the simulated downstream (slow, flaky)
///
/// The generator makes the jobs as the pipeline pulls them (backpressure reaches it from the
/// pool's queue and the stages' buffers). Malformed jobs are skipped by validate; a job whose
/// downstream calls fail three times is skipped by enrich; each skip is counted with its
/// reason. The pool does each job's final processing (signs the line) and hands it to the
/// batcher, which appends the lines to the file a batch at a time.
///
/// Four services: the producer (generator → pipeline → pool, then each job's line confirmed),
/// the pool, the batcher, and the progress line. On SIGINT or SIGTERM the group shuts them down
/// in reverse order: the producer stops the generator and drains what is in flight, then the
/// pool and the batcher drain, all within `--deadline`, after which the group cancels them.
/// Once every job is done, the producer returns and the group shuts down the same way.
///
/// The report accounts for every job (written, skipped by stage and reason, not generated,
/// dropped or refused at shutdown), gives the end-to-end latency, checks each structure's peak
/// against its limit, and checks that no Corral task outlived the group.
struct ServiceScenario: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "service",
        abstract: "The production job service (the default): generator → pipeline → worker pool → batched file writer, run as services with graceful shutdown on Ctrl-C.",
        discussion: """
            The generator makes --jobs jobs (CSV-like records, 0.5% malformed). "validate" \
            parses them and skips the malformed; "enrich" calls a simulated downstream that is \
            slow and flaky — behind a token-bucket rate limiter (--rate), a weighted quota \
            semaphore (20 permits: a light call takes 1, a heavy one — large orders — 5) and a \
            timeout per call (--timeout-ms), with 3 tries before the job is skipped; \
            "transform" renders the JSON line; a WorkerPool (--workers) signs each line and \
            hands it to a Batcher that appends the lines to --output a batch at a time.

            The pool, the batcher, the producer and the progress line run as \
            swift-service-lifecycle services in a ServiceGroup. Ctrl-C (SIGINT) or SIGTERM \
            starts a graceful shutdown: the generator stops, the work in flight drains within \
            --deadline, then the group cancels what is left. The report accounts for every job \
            either way, and the command fails if any check fails: the accounting, a peak above \
            its limit, or a Corral task still running after the group returned.

            With --overload, runs the "3 AM OOM" comparison instead: a task per request \
            without a limit against the same load through a bounded WorkerPool, tasks and \
            memory sampled once a second.
            """
    )

    @Option(help: "Jobs the generator makes.")
    var jobs = 30_000

    @Option(help: "Downstream calls the enrich stage makes at once.")
    var concurrency = 16

    @Option(help: "Workers of the pool that does each job's final processing.")
    var workers = 8

    @Option(help: "Fraction of downstream calls that fail with a 503 (retried), 0...1.")
    var failureRate = 0.05

    @Option(help: "Fraction of downstream calls that hang past the timeout (retried), 0...1.")
    var slowRate = 0.01

    @Option(help: "Mean downstream latency of a light call, in milliseconds (a heavy call takes twice as long).")
    var latencyMs = 3.0

    @Option(help: "Timeout of each downstream call, in milliseconds.")
    var timeoutMs = 25

    @Option(help: "Downstream calls allowed per second (a token bucket with a burst of 50).")
    var rate = 2_500

    @Option(help: "Seconds a graceful shutdown (Ctrl-C, SIGTERM, or the end of the jobs) may take to drain the work in flight before the service group cancels what is left.")
    var deadline = 10.0

    @Option(help: "The JSON Lines file to write (replaced if it exists).")
    var output = temporaryFilePath("corral-service.jsonl")

    @Option(help: "The least severe log messages written to stderr.")
    var logLevel = Logger.Level.warning

    @Flag(help: "Instead of the job service, show the \"3 AM OOM\": a task per request with no limit, side by side with the same load through a bounded WorkerPool (about 12 s; up to ~400 MB of memory).")
    var overload = false

    @Option(help: "Seed for the jobs and the simulated downstream.")
    var seed: UInt64 = 42

    func validate() throws {
        guard jobs > 0 else { throw ValidationError("--jobs must be greater than 0") }
        guard concurrency > 0 else { throw ValidationError("--concurrency must be greater than 0") }
        guard workers > 0 else { throw ValidationError("--workers must be greater than 0") }
        guard (0...1).contains(failureRate) else { throw ValidationError("--failure-rate must be within 0...1") }
        guard (0...1).contains(slowRate) else { throw ValidationError("--slow-rate must be within 0...1") }
        guard failureRate + slowRate <= 1 else { throw ValidationError("--failure-rate plus --slow-rate must not exceed 1") }
        guard latencyMs >= 0, latencyMs <= 10_000 else { throw ValidationError("--latency-ms must be within 0...10000") }
        guard timeoutMs > 0 else { throw ValidationError("--timeout-ms must be greater than 0") }
        guard rate > 0 else { throw ValidationError("--rate must be greater than 0") }
        guard deadline > 0, deadline <= 3_600 else { throw ValidationError("--deadline must be greater than 0 (and at most 3600)") }
        guard !output.isEmpty else { throw ValidationError("--output must not be empty") }
    }

    func run() async throws {
        if overload {
            try await OverloadComparison().run()
            return
        }
        var logger = Logger(label: "corral-demo") { StreamLogHandler.standardError(label: $0) }
        logger.logLevel = logLevel
        let drainDeadline = Duration.milliseconds(Int64(deadline * 1_000))
        let service = try JobService(
            jobs: jobs, concurrency: concurrency, workers: workers, rate: rate,
            downstream: Downstream(
                failureRate: failureRate, slowRate: slowRate, hang: .milliseconds(4 * timeoutMs),
                latency: .microseconds(Int64(latencyMs * 1_000)), seed: seed),
            timeout: .milliseconds(timeoutMs), output: output, seed: seed, logger: logger)

        print("""
            == service: \(jobs) jobs → validate → enrich → transform → WorkerPool → Batcher → \(output)
               enrich:  \(concurrency) calls at once to a downstream of ~\(fixed(latencyMs, digits: 1)) ms (\(percent(failureRate, of: 1)) failing, \
            \(percent(slowRate, of: 1)) hanging); \(rate) calls/s; quota \(JobService.quotaPermits) permits (light call \(JobService.lightCost), \
            heavy \(JobService.heavyCost)); timeout \(timeoutMs) ms; \(JobService.attempts) tries
               pool:    \(workers) workers, queue \(JobService.poolQueue); batcher: \(JobService.batchSize) lines or \(JobService.batchDelay.inMilliseconds) a write
               Ctrl-C or SIGTERM: graceful shutdown (the generator stops; the work in flight drains within \(deadline) s, then is cancelled)
            """)

        // The services, in start order; a graceful shutdown stops them in reverse: first the
        // producer (no more jobs; what is in flight drains through the pool and the batcher,
        // which are still running), then the pool, then the batcher, then the progress line.
        // The producer's return — every job done — shuts the group down the same way.
        var configuration = ServiceGroupConfiguration(
            services: [
                .init(service: ProgressReporter(service: service)),
                .init(service: service.batcher.service(drainTimeout: drainDeadline, logger: logger)),
                .init(service: service.pool.service(drainTimeout: drainDeadline, logger: logger)),
                .init(
                    service: JobProducer(service: service),
                    successTerminationBehavior: .gracefullyShutdownGroup,
                    failureTerminationBehavior: .gracefullyShutdownGroup),
            ],
            gracefulShutdownSignals: [.sigterm, .sigint],
            logger: logger
        )
        // The whole graceful shutdown gets --deadline; then the group cancels every service: the
        // pipeline drops what is in flight, the pool stops at once (running jobs cancelled,
        // queued ones rejected), the batcher writes what it holds. All of it is counted.
        configuration.maximumGracefulShutdownDuration = drainDeadline
        let group = ServiceGroup(configuration: configuration)

        // Every task a Corral structure starts inside the group is counted in this ledger (the
        // mechanism behind CorralTesting's leak check): none may be live once the group returns.
        let tasks = TaskLedger()
        var groupError: (any Error)?
        service.started()
        do {
            try await TaskLedger.$current.withValue(tasks) {
                try await group.run()
            }
        } catch {
            groupError = error
        }
        service.groupReturned()
        let leaked = await liveTasks(in: tasks, settle: .milliseconds(500))
        try service.file.close()

        let passed = try service.report(groupError: groupError, leakedTasks: leaked, deadline: drainDeadline)
        guard passed else { throw ExitCode.failure }
    }

    /// The tasks still live in `ledger`, after giving those that are finishing up to `settle`
    /// to end (a pipeline stage's tasks are cancelled as its iteration ends, and end a moment
    /// later).
    private func liveTasks(in ledger: TaskLedger, settle: Duration) async -> [TaskLedger.Owner: Int] {
        let clock = ContinuousClock()
        let deadline = clock.now + settle
        while ledger.liveTaskCount > 0 && clock.now < deadline {
            try? await Task.sleep(for: .milliseconds(5))
        }
        return ledger.liveTasks
    }
}

extension Logger.Level: @retroactive ExpressibleByArgument {}

// MARK: - The service

/// The job service's structures and counters, shared by its services and the report.
final class JobService: Sendable {
    /// The downstream's quota: permits, and what a light and a heavy call take.
    static let quotaPermits = 20
    static let lightCost = 1
    static let heavyCost = 5
    /// The rate limiter's bucket.
    static let burst = 50
    /// Tries of a downstream call before enrich skips the job, and the pause before the second.
    static let attempts = 3
    static let backoff = Duration.milliseconds(5)
    /// Jobs that may wait for a pool worker.
    static let poolQueue = 64
    /// The batcher's batches.
    static let batchSize = 256
    static let batchDelay = Duration.milliseconds(20)
    /// Fraction of the generated jobs that are malformed.
    static let malformedRate = 0.005
    /// How long the pool's final processing of a job waits on its (simulated) signing service.
    static let signingTime = Duration.milliseconds(1)

    /// The full pipeline: jobs in, JSON lines out.
    typealias Jobs = PipelineStage<PipelineStage<PipelineStage<JobSource, Stamped<Validated>>, Stamped<Enriched>>, Stamped<String>>

    let jobCount: Int
    let concurrency: Int
    let workers: Int
    let rate: Int
    let logger: Logger

    let generator = GeneratorControl()
    let ledger = FailureLedger()
    let quota: AsyncSemaphore
    let limiter: RateLimiter<ContinuousClock>
    let permitsInUse = PeakGauge()
    let calls = CallCounters()
    let jobs: Jobs
    let pool: WorkerPool
    let batcher: Batcher<Stamped<String>, Int, ContinuousClock>
    let file: OutputFile
    /// Each written job's latency, recorded by the batch handler as it writes.
    let latencies: LatencyLog
    /// The line numbers the producer got back through the jobs' handles and tickets.
    let confirmed: WrittenLines
    let producer = ProducerCounters()
    private let clock = Mutex(RunClock())

    /// When the rate limiter was created, the run started, the producer finished, and the
    /// group returned.
    private struct RunClock {
        /// Taken before the limiter is created, so that the rate checked against it in the
        /// report is never stricter than the limiter's own.
        var limiterCreated = ContinuousClock.now
        var started: ContinuousClock.Instant?
        var producerFinished: ContinuousClock.Instant?
        var groupReturned: ContinuousClock.Instant?
    }

    init(
        jobs jobCount: Int, concurrency: Int, workers: Int, rate: Int, downstream: Downstream,
        timeout: Duration, output: String, seed: UInt64, logger: Logger
    ) throws {
        self.jobCount = jobCount
        self.concurrency = concurrency
        self.workers = workers
        self.rate = rate
        self.logger = logger
        let file = try OutputFile(path: output)
        let latencies = LatencyLog(capacity: jobCount)
        let ledger = self.ledger
        let quota = AsyncSemaphore(permits: Self.quotaPermits)
        let limiter = RateLimiter(rate: rate, per: .seconds(1), burst: Self.burst)
        let enricher = Enricher(
            downstream: downstream, limiter: limiter, quota: quota, timeout: timeout,
            permitsInUse: permitsInUse, calls: calls)

        // The pipeline. Nothing runs yet: the stages' tasks start when the producer iterates it.
        let validated = JobSource(
            records: RawRecords(count: jobCount, malformedRate: Self.malformedRate, seed: seed), control: generator
        ).stage("validate", onError: .skip) { job in
            try await ledger.attempt("validate", line: job.id) { _ in try job.map { try $0.validated() } }
        }
        // Unordered: a job waiting out a timeout and a back-off does not hold back the ones
        // behind it (the file's lines carry their ids).
        let enriched = validated.stage(
            "enrich", concurrency: concurrency, buffer: 4 * concurrency, ordered: false,
            onError: .retry(attempts: Self.attempts, backoff: Self.backoff, then: .skip)
        ) { job in
            try await ledger.attempt("enrich", line: job.id, maxTries: Self.attempts) { attempt in
                try await enricher.enrich(job, attempt: attempt)
            }
        }
        self.jobs = enriched.stage("transform") { $0.map(\.jsonLine) }

        self.pool = WorkerPool(.init(workers: .fixed(workers), queueCapacity: Self.poolQueue, name: "final processing"))
        // One write a batch: a full batch at once, or what has come within the delay. The
        // handler notes each job's latency as its line is written.
        self.batcher = Batcher(maxSize: Self.batchSize, maxDelay: Self.batchDelay, name: "output file") { (batch: [Stamped<String>]) in
            do {
                let lineNumbers = try file.append(batch.map(\.value))
                latencies.record(batch, writtenAt: .now)
                return lineNumbers
            } catch {
                for line in batch { ledger.record("write", line: line.id, error: error) }
                throw error
            }
        }
        self.file = file
        self.latencies = latencies
        self.confirmed = WrittenLines(records: jobCount)
        self.quota = quota
        self.limiter = limiter
        CorralDiagnostics.track(quota, name: "downstream quota")
        CorralDiagnostics.track(pipeline: "jobs", jobs)
    }

    func started() { clock.withLock { $0.started = .now } }
    func groupReturned() { clock.withLock { $0.groupReturned = .now } }

    /// Seconds since the run started.
    var elapsed: Duration {
        clock.withLock { $0.started.map { $0.duration(to: .now) } ?? .zero }
    }

    // MARK: The producer's work

    /// Pulls the jobs through the pipeline and submits each to the pool (waiting while its
    /// queue is full: backpressure), keeping the handles of the last few hundred; as the
    /// window fills, the oldest job's line number is awaited through its handle and ticket.
    /// Returns once the pipeline has ended — all jobs, or the generator stopped by a graceful
    /// shutdown — and every job's line is confirmed; or, if the group cancels it (the drain
    /// deadline passed), as soon as it can: what was in flight is then accounted for by the
    /// pool's, the batcher's and the stages' counters.
    func produce() async throws {
        defer { clock.withLock { $0.producerFinished = .now } }
        let pool = self.pool
        let batcher = self.batcher
        let ledger = self.ledger
        var pending = PendingRing<JobHandle<BatchTicket<Int>>>(capacity: 2 * Self.batchSize + Self.poolQueue + workers)
        do {
            for try await job in jobs {
                producer.took()
                let handle: JobHandle<BatchTicket<Int>>
                do {
                    handle = try await pool.submit { try await Self.finish(job, batcher: batcher, ledger: ledger) }
                } catch {
                    producer.refused(error)  // not accepted: the pool is shut down, or we are cancelled
                    if Task.isCancelled { throw error }
                    continue
                }
                if let oldest = pending.append(handle) { try await confirm(oldest) }
            }
            while let handle = pending.removeFirst() { try await confirm(handle) }
            logger.info("every job is done", metadata: ["jobs": "\(generator.generated)"])
        } catch {
            guard Task.isCancelled else { throw error }
            producer.escalated()
            logger.warning("drain deadline passed: the service group cancelled the producer; the work in flight is dropped or stopped, and counted")
        }
    }

    /// A job's final processing, on a pool worker: signs its line (after a call to a simulated
    /// signing service) and hands it to the batcher.
    ///
    /// - Returns: The batcher's ticket for the line: its line number in the file, once written.
    private static func finish(
        _ job: Stamped<String>, batcher: Batcher<Stamped<String>, Int, ContinuousClock>, ledger: FailureLedger
    ) async throws -> BatchTicket<Int> {
        try await ledger.attempt("pool", line: job.id) { _ in
            try await Task.sleep(for: signingTime)
            do {
                return try batcher.enqueue(job.map(signed))
            } catch let error as BatcherError {
                // The batcher shuts down after the pool has drained, so a running job finds it
                // shut down only when the drain deadline passed: the group then cancels every
                // service at once, and the pool's cancellation of this job may come a moment
                // after the batcher's shutdown. Wait for it (a bounded wait: if it never
                // comes, the error stands) so that the job counts as stopped, not failed.
                try await Task.sleep(for: .seconds(5))
                throw error
            }
        }
    }

    /// Awaits a job's line number: its handle gives the ticket, the ticket the number. A
    /// failure is counted here as the producer saw it, and where it happened (the pool's or
    /// the batcher's counters, the ledger).
    private func confirm(_ handle: JobHandle<BatchTicket<Int>>) async throws {
        do {
            let ticket = try await handle.value
            confirmed.written(lineNumber: try await ticket.value)
        } catch {
            if Task.isCancelled { throw error }
            producer.unconfirmed(error)
        }
    }

    // MARK: Progress

    /// The live progress line: throughput, what is in flight where, errors so far.
    func progressLine(throughput: Double) -> String {
        let stages = jobs.pipelineStats
        let pool = self.pool.stats
        let batcher = self.batcher.stats
        let calls = self.calls.snapshot
        let skipped = stages.reduce(0) { $0 + $1.skipped }
        let shutdown = producer.shutdownRequested != nil ? " │ shutting down: draining" : ""
        return "  \(fixed(elapsed.inSeconds, digits: 1)) s │ written \(latencies.count)/\(jobCount), \(Int(throughput))/s │ "
            + "in flight: validate \(stages[0].inFlight), enrich \(stages[1].inFlight) (calls \(calls.inFlight), "
            + "permits \(quota.capacity - quota.availablePermits)/\(quota.capacity)), transform \(stages[2].inFlight), "
            + "pool \(pool.busy)+\(pool.queued) queued, batcher \(batcher.buffered) │ "
            + "503s \(calls.unavailable), timeouts \(calls.timedOut), skipped \(skipped)" + shutdown
    }

    // MARK: The report

    /// Prints the report and returns whether every check passed.
    func report(groupError: (any Error)?, leakedTasks: [TaskLedger.Owner: Int], deadline: Duration) throws -> Bool {
        let times = clock.withLock { $0 }
        let stages = jobs.pipelineStats
        let pool = self.pool.stats
        let batcher = self.batcher.stats
        let calls = self.calls.snapshot
        let producer = self.producer.snapshot
        let linesInFile = try OutputFile.countLines(atPath: file.path)
        let generated = generator.generated
        var checks: [(String, Bool)] = []

        // Every job ends in exactly one row. The pipeline's part: generated = skipped by a
        // stage + taken by the producer + dropped in flight (only when the group cancelled it).
        let skipped = stages.reduce(0) { $0 + $1.skipped }
        let dropped = generated - skipped - producer.taken
        let poolFailures = ledger.leftOut("pool")
        let writeFailures = ledger.leftOut("write")
        let refusedCount = producer.refused.values.reduce(0, +)
        var rows: [[String]] = [["written", "\(batcher.handled)", "lines in the file: \(linesInFile)"]]
        // Where the dropped jobs were: handed to a stage and neither passed on nor skipped by it.
        var upstream = generated
        var droppedIn: [String] = []
        for stage in stages {
            let lost = upstream - stage.emitted - stage.skipped
            if lost != 0 { droppedIn.append("\(stage.name) \(lost)") }
            upstream = stage.emitted
        }
        for stage in stages {
            rows.append(["skipped by \(stage.name)", "\(stage.skipped)", Self.reasons(ledger.leftOut(stage.name))])
        }
        rows += [
            ["not generated", "\(jobCount - generated)", "the generator stops at a graceful shutdown"],
            ["dropped in the pipeline", "\(dropped)", "in flight when the drain deadline cancels the pipeline" + (droppedIn.isEmpty ? "" : ": " + droppedIn.joined(separator: ", "))],
            ["refused by the pool", "\(refusedCount)", Self.reasons(producer.refused)],
            ["failed in the pool", "\(pool.failed)", Self.reasons(poolFailures)],
            ["cancelled in the pool", "\(pool.cancelled)", "running when the pool is stopped at once"],
            ["rejected by the pool", "\(pool.rejected)", "queued when the pool is stopped at once"],
            ["failed to write", "\(batcher.failed)", Self.reasons(writeFailures)],
        ]
        let outcomes = batcher.handled + skipped + (jobCount - generated) + dropped + refusedCount
            + pool.failed + pool.cancelled + pool.rejected + batcher.failed + batcher.withdrawn
        if batcher.withdrawn > 0 { rows.append(["withdrawn from the batcher", "\(batcher.withdrawn)", ""]) }
        print()
        print("jobs:                   \(jobCount)")
        print(table(rows, leftAligned: [0, 2]))

        // The structures' own invariants tie the rows together, so that none is a remainder
        // except the pipeline's drops (which must be 0 unless the deadline cut the drain short).
        let escalated = producer.escalated
        checks.append(("every job in exactly one row", outcomes == jobCount))
        checks.append(("every skip has its reason", stages.allSatisfy { ledger.leftOut($0.name).values.reduce(0, +) == $0.skipped }))
        checks.append(("the producer took what it submitted or was refused", producer.taken == pool.submitted + refusedCount))
        checks.append(("pool: submitted == completed + failed + cancelled + rejected", pool.submitted == pool.completed + pool.failed + pool.cancelled + pool.rejected))
        checks.append(("every completed pool job gave the batcher its line", pool.completed == batcher.submitted && pool.failed == poolFailures.values.reduce(0, +)))
        checks.append(("batcher: submitted == handled + failed + withdrawn, handled == lines in the file", batcher.submitted == batcher.handled + batcher.failed + batcher.withdrawn && batcher.handled == linesInFile))
        checks.append(("every written job's latency recorded", latencies.count == batcher.handled))
        // The downstream's failures are part of the simulation (retried, then skipped); a job
        // that fails in the service's own processing or write is not.
        checks.append(("no job failed in the pool or the write", pool.failed == 0 && batcher.failed == 0))
        if !escalated {
            checks.append(("nothing dropped", dropped == 0))
            checks.append(("every written line confirmed to the producer by its ticket, line numbers 1...\(confirmed.count) each once", confirmed.count == linesInFile && confirmed.isContiguous))
            checks.append(("every failed job's error reached the producer through its handle or ticket", producer.unconfirmed.values.reduce(0, +) == pool.failed + batcher.failed))
        }

        // End-to-end latency: from the generator to the file.
        let percentiles = latencies.percentiles([0.5, 0.99, 1])
        print()
        if percentiles.isEmpty {
            print("latency, generated → written: no job written")
        } else {
            print("latency, generated → written: p50 \(percentiles[0].inMilliseconds), p99 \(percentiles[1].inMilliseconds), max \(percentiles[2].inMilliseconds) (\(latencies.count) jobs)")
        }

        // Peaks against their limits. The token bucket allows at most its burst plus its rate
        // times the time since it was created (no call is made once the group has returned).
        let callsAllowed = Self.burst + Int(Double(rate) * times.limiterCreated.duration(to: times.groupReturned ?? .now).inSeconds)
        let peaks: [(String, Int, Int, String)] = [
            ("enrich: downstream calls in flight", calls.peakInFlight, concurrency, "of \(concurrency)"),
            ("quota: permits in use", permitsInUse.peak, Self.quotaPermits, "of \(Self.quotaPermits)"),
            ("rate limiter: calls made", calls.made, callsAllowed, "≤ \(callsAllowed) (burst \(Self.burst) + \(rate)/s)"),
            ("pool: busy workers", pool.peakBusy, workers, "of \(workers)"),
            ("pool: queued jobs", pool.peakQueued, Self.poolQueue, "of \(Self.poolQueue)"),
            ("batcher: handler calls at once", batcher.peakConcurrentBatches, self.batcher.maxConcurrentBatches, "of \(self.batcher.maxConcurrentBatches)"),
        ]
        print()
        print("peaks, each against its limit:")
        print(table(peaks.map { name, peak, limit, against in
            [name, "\(peak)", against, peak <= limit ? "ok" : "OVER THE LIMIT"]
        }, leftAligned: [0, 2]))
        for (name, peak, limit, _) in peaks { checks.append(("\(name) within its limit", peak <= limit)) }

        // Leaks: after the group returned, nothing of the service is running.
        let structuresIdle = pool.workers == 0 && batcher.inFlightBatches == 0 && stages.allSatisfy { $0.inFlight == 0 }
            && calls.inFlight == 0 && quota.availablePermits == quota.capacity
        let leaked = leakedTasks.values.reduce(0, +)
        print()
        print("leaked tasks: \(leaked)\(leaked == 0 ? "" : " — " + leakedTasks.map { "\($0.key) × \($0.value)" }.joined(separator: ", "))")
        print("  after the group returned: pool workers \(pool.workers), batcher handler calls \(batcher.inFlightBatches), "
            + "in flight in \(stages.map { "\($0.name) \($0.inFlight)" }.joined(separator: ", ")), downstream calls \(calls.inFlight), "
            + "quota permits held \(quota.capacity - quota.availablePermits); Corral tasks live (TaskLedger): \(leaked)")
        checks.append(("no task outlived the group", leaked == 0 && structuresIdle))
        print()
        print("CorralDiagnostics.snapshot() at the end:")
        print(CorralDiagnostics.snapshot().table.split(separator: "\n").map { "  " + $0 }.joined(separator: "\n"))

        // What happened, in numbers.
        let elapsed = times.started.map { $0.duration(to: times.producerFinished ?? .now) } ?? .zero
        print()
        print("""
            downstream calls:       \(calls.made): \(calls.succeeded) answered, \(calls.unavailable) × 503, \(calls.timedOut) timed out\
            \(calls.cancelled > 0 ? ", \(calls.cancelled) cancelled at shutdown" : ""); \(stages[1].retried) retried
            batches written:        \(batcher.batches): \(batcher.flushedBySize) full, \(batcher.flushedByDelay) after \(Self.batchDelay.inMilliseconds), \
            \(batcher.flushedByShutdown) at shutdown; \(fixed(Double(batcher.handled + batcher.failed) / Double(max(1, batcher.batches)), digits: 1)) lines a batch on average
            elapsed:                \(fixed(elapsed.inSeconds, digits: 2)) s, \(Int(Double(batcher.handled) / max(elapsed.inSeconds, 1e-9))) jobs written a second
            """)
        if let requested = producer.shutdownRequested, let started = times.started, let returned = times.groupReturned {
            let drain = requested.duration(to: returned)
            print("shutdown:               graceful, requested after \(fixed(started.duration(to: requested).inSeconds, digits: 2)) s "
                + "(the generator stopped at job \(generated)); drained in \(fixed(drain.inSeconds, digits: 2)) s"
                + (escalated ? " — the \(deadline.inSeconds) s drain deadline passed: the group cancelled the rest" : ""))
        } else if escalated {
            print("shutdown:               the \(deadline.inSeconds) s drain deadline passed: the group cancelled the rest")
        }
        if let groupError, !(escalated && groupError is CancellationError) {
            print("service group error:    \(groupError)")
            checks.append(("the service group ended without an error", false))
        }

        print()
        let failed = checks.filter { !$0.1 }
        if failed.isEmpty {
            print("checks: all \(checks.count) passed (accounting, limits, leaks)")
        } else {
            print("checks: \(failed.count) of \(checks.count) FAILED:")
            for (name, _) in failed { print("  FAILED: \(name)") }
        }
        return failed.isEmpty
    }

    /// `reason × count, …`, the most frequent first.
    private static func reasons(_ counts: [String: Int]) -> String {
        counts.sorted { ($1.value, $0.key) < ($0.value, $1.key) }.map { "\($0.key) × \($0.value)" }.joined(separator: ", ")
    }
}

/// A JSON line signed: `,"sig":"…"` (an FNV-1a hash of the line, in hex) added before the
/// closing brace.
func signed(_ line: String) -> String {
    var hash: UInt64 = 0xcbf2_9ce4_8422_2325
    for byte in line.utf8 {
        hash = (hash ^ UInt64(byte)) &* 0x0000_0100_0000_01b3
    }
    let hex = String(hash, radix: 16)
    return line.dropLast() + ",\"sig\":\"" + String(repeating: "0", count: 16 - hex.count) + hex + "\"}"
}

// MARK: - The services

/// The service that runs the jobs: see ``JobService/produce()``. A graceful shutdown stops the
/// generator; the jobs already made drain through the pipeline, the pool and the batcher
/// (which the group shuts down after this service has returned).
struct JobProducer: Service, CustomStringConvertible {
    let service: JobService

    var description: String { "JobProducer" }

    func run() async throws {
        let service = self.service
        try await withGracefulShutdownHandler {
            try await service.produce()
        } onGracefulShutdown: {
            service.producer.shutdownWasRequested()
            service.generator.stop()
            service.logger.notice("graceful shutdown: the generator stopped; draining the jobs in flight", metadata: ["generated": "\(service.generator.generated)"])
        }
    }
}

/// The service that prints the progress line: on a terminal rewritten in place four times a
/// second, otherwise a line a second; and once more when it stops. It is the first service,
/// so the last to stop: the drain shows too.
struct ProgressReporter: Service, CustomStringConvertible {
    let service: JobService

    var description: String { "ProgressReporter" }

    func run() async {
        let service = self.service
        let interval: Duration = isatty(STDOUT_FILENO) != 0 ? .milliseconds(250) : .seconds(1)
        await cancelWhenGracefulShutdown {
            // The throughput over the last second or so: (when, lines written) samples.
            var samples = [(ContinuousClock.now, 0)]
            while !Task.isCancelled {
                do {
                    try await Task.sleep(for: interval)
                } catch {
                    break  // the group is shutting this service down
                }
                samples.append((.now, service.latencies.count))
                if samples.count > 5 { samples.removeFirst() }
                let (from, to) = (samples[0], samples[samples.count - 1])
                printStatus(service.progressLine(throughput: Double(to.1 - from.1) / from.0.duration(to: to.0).inSeconds))
            }
        }
        // The state once everything has drained (throughput: the average of the run).
        printStatus(service.progressLine(throughput: Double(service.latencies.count) / max(service.elapsed.inSeconds, 1e-9)))
        if isatty(STDOUT_FILENO) != 0 { print() }  // end the progress line
    }
}

// MARK: - Jobs and counters

/// A job's payload at some stage, with the job's id (its record's line number) and the time
/// the generator made it: the end-to-end latency, for the cost of carrying an instant along.
struct Stamped<Value: Sendable>: Sendable {
    var id: Int
    var generatedAt: ContinuousClock.Instant
    var value: Value

    func map<T>(_ transform: (Value) throws -> T) rethrows -> Stamped<T> {
        Stamped<T>(id: id, generatedAt: generatedAt, value: try transform(value))
    }
}

/// The generator: the jobs, each a raw record stamped with the time it was made. They are
/// made as the pipeline pulls them (so its backpressure reaches the generator), until
/// ``GeneratorControl/stop()``.
struct JobSource: AsyncSequence, Sendable {
    var records: RawRecords
    var control: GeneratorControl

    struct AsyncIterator: AsyncIteratorProtocol {
        var records: RawRecords.AsyncIterator
        let control: GeneratorControl

        mutating func next() async -> Stamped<RawRecord>? {
            guard !control.isStopped, let record = await records.next() else { return nil }
            control.generated(1)
            return Stamped(id: record.line, generatedAt: .now, value: record)
        }
    }

    func makeAsyncIterator() -> AsyncIterator {
        AsyncIterator(records: records.makeAsyncIterator(), control: control)
    }
}

/// How many jobs the generator has made, and whether it has been stopped.
final class GeneratorControl: Sendable {
    private let stopped = Atomic<Bool>(false)
    private let count = Atomic<Int>(0)

    func stop() { stopped.store(true, ordering: .relaxed) }
    var isStopped: Bool { stopped.load(ordering: .relaxed) }
    func generated(_ jobs: Int) { count.add(jobs, ordering: .relaxed) }
    var generated: Int { count.load(ordering: .relaxed) }
}

/// The enrich stage's work on one job: a customer look-up downstream, behind the rate limiter
/// and the weighted quota, under a per-call timeout.
struct Enricher: Sendable {
    let downstream: Downstream
    let limiter: RateLimiter<ContinuousClock>
    let quota: AsyncSemaphore
    let timeout: Duration
    let permitsInUse: PeakGauge
    let calls: CallCounters

    func enrich(_ job: Stamped<Validated>, attempt: Int) async throws -> Stamped<Enriched> {
        let record = job.value
        let heavy = record.isLarge  // a large order gets the full (heavy) check
        let cost = heavy ? JobService.heavyCost : JobService.lightCost
        try await limiter.wait()  // the downstream's rate limit: waits for a token
        return try await quota.withPermits(cost) {  // its quota: waits for the permits, released on every path
            permitsInUse.add(cost)
            defer { permitsInUse.add(-cost) }
            calls.started()
            do {
                let customer = try await withTimeout(timeout) { [downstream] in
                    try await downstream.lookUp(record.customer, line: record.line, attempt: attempt, heavy: heavy)
                }
                calls.ended(nil)
                return job.map { Enriched(record: $0, customer: customer) }
            } catch {
                calls.ended(error)
                throw error
            }
        }
    }
}

/// A level that goes up and down (permits in use) and the highest it reached.
final class PeakGauge: Sendable {
    private let state = Mutex((level: 0, peak: 0))

    func add(_ delta: Int) {
        state.withLock { state in
            state.level += delta
            state.peak = max(state.peak, state.level)
        }
    }

    var level: Int { state.withLock { $0.level } }
    var peak: Int { state.withLock { $0.peak } }
}

/// The downstream calls: in flight (and the peak), and how each ended.
final class CallCounters: Sendable {
    struct Snapshot {
        var made = 0
        var inFlight = 0
        var peakInFlight = 0
        var succeeded = 0
        var unavailable = 0
        var timedOut = 0
        var cancelled = 0
        var other = 0
    }

    private let state = Mutex(Snapshot())

    func started() {
        state.withLock { calls in
            calls.made += 1
            calls.inFlight += 1
            calls.peakInFlight = max(calls.peakInFlight, calls.inFlight)
        }
    }

    /// A call ended, with `error` or (nil) an answer.
    func ended(_ error: (any Error)?) {
        state.withLock { calls in
            calls.inFlight -= 1
            switch error {
            case nil: calls.succeeded += 1
            case is DownstreamUnavailable: calls.unavailable += 1
            case is TimeoutError: calls.timedOut += 1
            case is CancellationError: calls.cancelled += 1
            default: calls.other += 1
            }
        }
    }

    var snapshot: Snapshot { state.withLock { $0 } }
}

/// What the producer saw: jobs taken from the pipeline, submissions the pool refused, jobs
/// whose line it could not confirm, and whether (and when) a shutdown reached it.
final class ProducerCounters: Sendable {
    struct Snapshot {
        var taken = 0
        var refused: [String: Int] = [:]
        var unconfirmed: [String: Int] = [:]
        var shutdownRequested: ContinuousClock.Instant?
        var escalated = false
    }

    private let state = Mutex(Snapshot())

    func took() { state.withLock { $0.taken += 1 } }
    func refused(_ error: any Error) { state.withLock { $0.refused["\(error)", default: 0] += 1 } }
    func unconfirmed(_ error: any Error) { state.withLock { $0.unconfirmed["\(error)", default: 0] += 1 } }
    func shutdownWasRequested() { state.withLock { $0.shutdownRequested = $0.shutdownRequested ?? .now } }
    func escalated() { state.withLock { $0.escalated = true } }

    var shutdownRequested: ContinuousClock.Instant? { state.withLock { $0.shutdownRequested } }
    var snapshot: Snapshot { state.withLock { $0 } }
}

/// Each written job's latency, from the generator to the file, recorded a batch at a time.
final class LatencyLog: Sendable {
    private let nanoseconds: Mutex<[Int64]>
    private let written = Atomic<Int>(0)

    init(capacity: Int) {
        var storage: [Int64] = []
        storage.reserveCapacity(capacity)
        nanoseconds = Mutex(storage)
    }

    func record(_ batch: [Stamped<String>], writtenAt now: ContinuousClock.Instant) {
        nanoseconds.withLock { log in
            for job in batch {
                let (seconds, attoseconds) = job.generatedAt.duration(to: now).components
                log.append(seconds * 1_000_000_000 + attoseconds / 1_000_000_000)
            }
        }
        written.add(batch.count, ordering: .relaxed)
    }

    /// The jobs written so far.
    var count: Int { written.load(ordering: .relaxed) }

    /// The latencies at `fractions` (0...1) of the sorted log; empty when nothing was written.
    func percentiles(_ fractions: [Double]) -> [Duration] {
        let sorted = nanoseconds.withLock { $0 }.sorted()
        guard !sorted.isEmpty else { return [] }
        return fractions.map { fraction in
            .nanoseconds(sorted[min(sorted.count - 1, Int(fraction * Double(sorted.count)))])
        }
    }
}
