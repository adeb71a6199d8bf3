import ArgumentParser
import Corral

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Go's pipeline pattern done with Corral: raw records go through three stages, each with
/// tasks of its own and a bounded buffer to the next, and then through a batcher that
/// appends them to a file a batch at a time.
///
///     source ─▶ validate ─▶ enrich (16 at once) ─▶ transform ─▶ Batcher ─▶ output file
///
/// Malformed records fail validation and are skipped. The enrich stage calls a simulated
/// downstream service under a per-call timeout; failed and timed-out calls are retried, and
/// a record whose every try fails is skipped. Each record left out is counted with its
/// reason. The report shows every stage's statistics (where the time goes, which stage is
/// the bottleneck) and the batches written, and checks that `records in == lines in the
/// file + records skipped`.
struct PipelineScenario: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "pipeline",
        abstract: "A validate → enrich → transform pipeline into a batched file writer: skips, retries, timeouts, per-stage statistics.",
        discussion: """
            The source produces CSV-like records (`id,customer,amount,currency`), some of them \
            malformed. "validate" parses them (malformed ones are skipped); "enrich" looks each \
            customer up in a simulated downstream service that takes 1–2 ms, fails now and \
            then, and sometimes hangs past the timeout (each call is tried up to 3 times, \
            then the record is skipped; records are passed on as they are ready unless \
            --ordered); "transform" turns the record into a JSON line; a Batcher appends the \
            lines to the output file, a batch a write. The report counts every skipped record \
            by reason, shows each stage's statistics and the bottleneck, and checks: records \
            in == lines in the file + skipped (the command fails otherwise).
            """
    )

    @Option(help: "Records the source produces.")
    var records = 20_000

    @Option(help: "Fraction of the records that are malformed (validation skips them), 0...1.")
    var malformedRate = 0.01

    @Option(help: "Fraction of downstream calls that fail (the enrich stage retries them), 0...1.")
    var failureRate = 0.1

    @Option(help: "Fraction of downstream calls that hang past the timeout (retried too), 0...1.")
    var slowRate = 0.02

    @Option(help: "Downstream calls the enrich stage makes at once.")
    var concurrency = 16

    @Option(help: "Timeout of each downstream call, in milliseconds (a call takes 1–2 ms).")
    var timeoutMs = 10

    @Flag(help: "Keep the records in order through the enrich stage: a record being retried then holds back the ones behind it (watch the enrich workers' idle time and the elapsed time).")
    var ordered = false

    @Option(help: "Most lines the batcher writes at once.")
    var batchSize = 100

    @Option(help: "Longest a batch waits to fill before it is written, in milliseconds.")
    var batchDelayMs = 20

    @Option(help: "The file to write the JSON lines to (replaced if it exists).")
    var output = PipelineScenario.defaultOutputPath

    @Option(help: "Seed for the records and the simulated downstream.")
    var seed: UInt64 = 42

    /// `corral-pipeline.jsonl` in the temporary directory (`$TMPDIR`, or `/tmp`).
    static var defaultOutputPath: String { temporaryFilePath("corral-pipeline.jsonl") }

    /// How many times the enrich stage tries a downstream call before it skips the record.
    static let enrichAttempts = 3

    func validate() throws {
        guard records > 0 else { throw ValidationError("--records must be greater than 0") }
        guard (0...1).contains(malformedRate) else { throw ValidationError("--malformed-rate must be within 0...1") }
        guard (0...1).contains(failureRate) else { throw ValidationError("--failure-rate must be within 0...1") }
        guard (0...1).contains(slowRate) else { throw ValidationError("--slow-rate must be within 0...1") }
        guard failureRate + slowRate <= 1 else { throw ValidationError("--failure-rate plus --slow-rate must not exceed 1") }
        guard concurrency > 0 else { throw ValidationError("--concurrency must be greater than 0") }
        guard timeoutMs > 0 else { throw ValidationError("--timeout-ms must be greater than 0") }
        guard batchSize > 0 else { throw ValidationError("--batch-size must be greater than 0") }
        guard batchDelayMs >= 0 else { throw ValidationError("--batch-delay-ms must not be negative") }
        guard !output.isEmpty else { throw ValidationError("--output must not be empty") }
    }

    func run() async throws {
        let file = try OutputFile(path: output)
        defer { try? file.close() }  // if the run fails; closing twice does nothing
        let ledger = FailureLedger()
        let tally = WrittenLines(records: records)
        let downstream = Downstream(failureRate: failureRate, slowRate: slowRate, hang: .milliseconds(5 * timeoutMs), seed: seed)
        let timeout = Duration.milliseconds(timeoutMs)

        // The pipeline. Nothing runs yet: the stages' tasks start when it is iterated.
        let validated = RawRecords(count: records, malformedRate: malformedRate, seed: seed)
            .stage("validate", onError: .skip) { raw in
                try await ledger.attempt("validate", line: raw.line) { _ in try raw.validated() }
            }
        // Unordered by default: the output is a set of JSON lines, each with its id, so a record
        // that waits out timeouts and back-offs need not hold back the ones behind it.
        let enriched = validated.stage(
            "enrich", concurrency: concurrency, buffer: max(64, 4 * concurrency), ordered: ordered,
            onError: .retry(attempts: Self.enrichAttempts, backoff: .milliseconds(2), then: .skip)
        ) { record in
            try await ledger.attempt("enrich", line: record.line, maxTries: Self.enrichAttempts) { attempt in
                let customer = try await withTimeout(timeout) {
                    try await downstream.lookUp(record.customer, line: record.line, attempt: attempt)
                }
                return Enriched(record: record, customer: customer)
            }
        }
        let lines = enriched.stage("transform") { $0.jsonLine }

        // One write a batch: a full batch at once, or what has come within the delay.
        let batcher = Batcher(maxSize: batchSize, maxDelay: .milliseconds(batchDelayMs), name: "output file") { (batch: [String]) in
            try file.append(batch)  // each line's number in the file
        }

        print("== pipeline: \(records) records (\(percent(malformedRate, of: 1)) malformed) → validate → enrich (\(concurrency) at once, timeout \(timeoutMs) ms, \(percent(failureRate, of: 1)) failing, \(percent(slowRate, of: 1)) hanging calls\(ordered ? ", ordered" : "")) → transform → batches of \(batchSize) or \(batchDelayMs) ms → \(output)")
        let clock = ContinuousClock()
        let start = clock.now
        // The batcher's run() and the consumer in one error group: an error in either (a
        // failed write, not a skipped record: those are handled by the stages' policies)
        // cancels the other and is thrown here.
        try await withErrorGroup(name: "pipeline scenario") { group in
            try await group.addTask { try await batcher.run() }
            try await group.addTask {
                defer {
                    batcher.shutdown()  // on every path, so that run() returns
                    tally.finish()
                }
                // Up to two batches' worth of lines wait on the batcher (enqueue does not wait
                // for the write); their tickets are awaited oldest first, so the pipeline's
                // backpressure reaches through the batcher to the file.
                var pending = PendingRing<BatchTicket<Int>>(capacity: 2 * batchSize)
                for try await line in lines {
                    if let oldest = pending.append(try batcher.enqueue(line)) {
                        tally.written(lineNumber: try await oldest.value)
                    }
                }
                while let ticket = pending.removeFirst() {
                    tally.written(lineNumber: try await ticket.value)
                }
            }
            try await group.addTask {
                // A progress line every half second while the records flow: where they are.
                // (It looks for the end every 50 ms, so as not to hold up the group.)
                var tick = 0
                while !tally.isFinished && !Task.isCancelled {
                    if tick % 10 == 0 {
                        let stats = lines.pipelineStats
                        let flowing = stats.map { "\($0.name) \($0.inFlight)" }.joined(separator: ", ")
                        printStatus("  read \(stats[0].received), in flight: \(flowing); written \(tally.count)")
                    }
                    tick += 1
                    try? await Task.sleep(for: .milliseconds(50))
                }
            }
        }
        let elapsed = start.duration(to: tally.finishedAt ?? clock.now)  // the last line written
        try file.close()
        if isatty(STDOUT_FILENO) != 0 { print() }  // end the progress line

        // The accounting: every record is either a line of the file or skipped by a stage,
        // for a reason the ledger knows.
        let stages = lines.pipelineStats
        let linesInFile = try OutputFile.countLines(atPath: output)
        let skipped = stages.reduce(0) { $0 + $1.skipped }
        let reasonsAddUp = stages.allSatisfy { ledger.leftOut($0.name).values.reduce(0, +) == $0.skipped }
        let linesNumbered = tally.count == linesInFile && tally.isContiguous
        let accounted = records == linesInFile + skipped && stages[0].received == records && reasonsAddUp && linesNumbered
        let batches = batcher.stats

        print("""
            records in:        \(records) (received by validate: \(stages[0].received))
            written:           \(linesInFile) lines in the file (counted after the run); the batcher's line numbers are 1...\(tally.count), each once: \(linesNumbered ? "yes" : "NO")
            skipped:           \(skipped)
            """)
        print(table(stages.map { stage in
            let reasons = ledger.leftOut(stage.name).sorted { ($1.value, $0.key) < ($0.value, $1.key) }
            return [stage.name, "\(stage.skipped)", reasons.map { "\($0.key) × \($0.value)" }.joined(separator: ", ")]
        }, leftAligned: [0, 2]))
        print("accounting:        records in == written + skipped: \(records == linesInFile + skipped ? "yes" : "NO"), every skip has its reason: \(reasonsAddUp ? "yes" : "NO")")
        print()
        print("stages:")
        print(stageTable(stages, elapsed: elapsed))
        print("""
              waiting for input:  time the workers had nothing to do, summed over them (and % of their time)
              waiting for output: time the stage took no more input because its buffer was full of results
                                  downstream had not taken (and % of the run)
              bottleneck: \(bottleneck(of: stages, elapsed: elapsed))

            batches written:   \(batches.batches): \(batches.flushedBySize) full, \(batches.flushedByDelay) after \(batchDelayMs) ms, \(batches.flushedByShutdown) at shutdown; \(fixed(Double(batches.submitted) / Double(max(1, batches.batches)), digits: 1)) lines a batch on average
            batcher:           \(batches.submitted) lines submitted, \(batches.handled) handled, \(batches.failed) failed, \(batches.withdrawn) withdrawn
            elapsed:           \(fixed(elapsed.inSeconds, digits: 2)) s
            throughput:        \(Int(Double(records) / max(elapsed.inSeconds, 1e-9))) records/s
            """)
        guard accounted, batches.handled == linesInFile, batches.submitted == batches.handled else { throw ExitCode.failure }
    }

    /// The concurrency each stage was built with, by name.
    private func workers(of stage: StageStats) -> Int {
        stage.name == "enrich" ? concurrency : 1
    }

    /// Every stage's counters, a row each.
    private func stageTable(_ stages: [StageStats], elapsed: Duration) -> String {
        var rows = [["stage", "workers", "received", "emitted", "skipped", "retried", "in flight", "waiting for input", "", "waiting for output", ""]]
        for stage in stages {
            rows.append([
                stage.name, "\(workers(of: stage))", "\(stage.received)", "\(stage.emitted)", "\(stage.skipped)",
                "\(stage.retried)", "\(stage.inFlight)",
                stage.waitingForInput.inMilliseconds, percent(stage.waitingForInput.inSeconds, of: Double(workers(of: stage)) * elapsed.inSeconds),
                stage.waitingForOutput.inMilliseconds, percent(stage.waitingForOutput.inSeconds, of: elapsed.inSeconds),
            ])
        }
        return table(rows)
    }

    /// Where the pipeline is held up: the last stage whose workers are kept busy (idle less
    /// than half their time). The stages after it wait for input; the ones before it wait
    /// for room in their buffers.
    private func bottleneck(of stages: [StageStats], elapsed: Duration) -> String {
        let idle = { (stage: StageStats) in
            stage.waitingForInput.inSeconds / (Double(workers(of: stage)) * elapsed.inSeconds)
        }
        guard let busiest = stages.lastIndex(where: { idle($0) < 0.5 }) else {
            return "the source (every stage's workers are idle more than half the time)"
        }
        let stage = stages[busiest]
        if busiest == stages.count - 1, workers(of: stage) == 1, stage.waitingForOutput.inSeconds > 0.5 * elapsed.inSeconds {
            return "the batcher and the file (\(stage.name), the last stage, waits for them \(percent(stage.waitingForOutput.inSeconds, of: elapsed.inSeconds)) of the run)"
        }
        let after = stages[(busiest + 1)...].map { "\($0.name) idle \(percent(idle($0), of: 1))" }
        return "\(stage.name) — its workers idle \(percent(idle(stage), of: 1)) of their time"
            + (after.isEmpty ? "" : "; after it, " + after.joined(separator: ", "))
    }
}
