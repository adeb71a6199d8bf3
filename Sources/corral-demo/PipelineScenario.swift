import ArgumentParser
import Corral
import Synchronization

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
    static var defaultOutputPath: String {
        let directory = getenv("TMPDIR").map { String(cString: $0) }.flatMap { $0.isEmpty ? nil : $0 } ?? "/tmp"
        return (directory.hasSuffix("/") ? directory : directory + "/") + "corral-pipeline.jsonl"
    }

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
            try await ledger.attempt("enrich", line: record.line) { attempt in
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
                var pending = TicketRing<Int>(capacity: 2 * batchSize)
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

// MARK: - Records

/// A line of the source, as read: `id,customer,amount,currency`, e.g. `10042,c-0193,19.99,EUR`.
struct RawRecord: Sendable {
    /// The line number in the source, from 1: identifies the record in the error counts.
    var line: Int
    var text: String

    /// The record parsed and checked.
    ///
    /// - Throws: ``MalformedRecord`` saying what is wrong.
    func validated() throws(MalformedRecord) -> Validated {
        let fields = text.split(separator: ",", omittingEmptySubsequences: false)
        guard fields.count == 4 else { throw MalformedRecord(line: line, reason: .fieldCount) }
        guard let id = Int(fields[0]), id >= 0 else { throw MalformedRecord(line: line, reason: .id) }
        let customer = fields[1]
        guard customer.hasPrefix("c-"), customer.count > 2, customer.dropFirst(2).allSatisfy({ ("0"..."9").contains($0) }) else {
            throw MalformedRecord(line: line, reason: .customer)
        }
        let amount = fields[2].split(separator: ".", omittingEmptySubsequences: false)
        guard amount.count == 2, amount[1].count == 2, let whole = Int(amount[0]), let cents = Int(amount[1]), whole >= 0, cents >= 0 else {
            throw MalformedRecord(line: line, reason: .amount)
        }
        guard let currency = Currency(rawValue: String(fields[3])) else {
            throw MalformedRecord(line: line, reason: .currency)
        }
        return Validated(line: line, id: id, customer: String(customer), amountCents: whole * 100 + cents, currency: currency)
    }
}

/// Why ``RawRecord/validated()`` refused a record.
struct MalformedRecord: Error, CustomStringConvertible {
    enum Reason: String, CaseIterable {
        case fieldCount = "wrong number of fields"
        case id = "bad id"
        case customer = "bad customer"
        case amount = "bad amount"
        case currency = "unknown currency"
    }

    var line: Int
    var reason: Reason

    var description: String { "line \(line): \(reason.rawValue)" }
}

enum Currency: String, Sendable, CaseIterable {
    case eur = "EUR", usd = "USD", gbp = "GBP"

    /// A fixed rate, good enough for a demo: euro cents for 100 cents of this currency.
    var euroCentsPer100: Int {
        switch self {
        case .eur: 100
        case .usd: 92
        case .gbp: 117
        }
    }
}

/// A record that passed validation.
struct Validated: Sendable {
    var line: Int
    var id: Int
    /// `c-` and digits (checked): safe to write into JSON as it is.
    var customer: String
    var amountCents: Int
    var currency: Currency
}

/// What the downstream service knows about a customer.
struct Customer: Sendable {
    enum Tier: String, Sendable {
        case gold, silver, bronze

        /// The discount, in percent.
        var discount: Int {
            switch self {
            case .gold: 10
            case .silver: 5
            case .bronze: 0
            }
        }
    }

    var tier: Tier
    var region: String
}

/// A validated record with its customer's details.
struct Enriched: Sendable {
    var record: Validated
    var customer: Customer

    /// The output record, a line of JSON: the amount in euros, after the tier's discount.
    var jsonLine: String {
        let euroCents = record.amountCents * record.currency.euroCentsPer100 / 100
        let discounted = euroCents * (100 - customer.tier.discount) / 100
        return """
            {"id":\(record.id),"customer":"\(record.customer)","tier":"\(customer.tier.rawValue)",\
            "region":"\(customer.region)","amount":"\(decimal(record.amountCents))",\
            "currency":"\(record.currency.rawValue)","eur":"\(decimal(discounted))"}
            """
    }

    private func decimal(_ cents: Int) -> String {
        "\(cents / 100)." + (cents % 100 < 10 ? "0" : "") + "\(cents % 100)"
    }
}

/// The source: `count` raw records, made as the pipeline pulls them (so its backpressure
/// reaches the source), a fraction `malformedRate` of them malformed in one of five ways.
/// Reproducible from `seed`.
struct RawRecords: AsyncSequence, Sendable {
    var count: Int
    var malformedRate: Double
    var seed: UInt64

    struct AsyncIterator: AsyncIteratorProtocol {
        var source: RawRecords
        var line = 0
        var random: SplitMix64

        mutating func next() async -> RawRecord? {
            guard line < source.count else { return nil }
            line += 1
            var id = "\(10_000 + line)"
            var customer = "c-\(Int.random(in: 0..<5_000, using: &random))"
            var amount = "\(Int.random(in: 1..<500, using: &random)).\(Int.random(in: 10..<100, using: &random))"
            var currency = Currency.allCases.randomElement(using: &random)!.rawValue
            var fields: Int = 4
            if Double.random(in: 0..<1, using: &random) < source.malformedRate {
                switch MalformedRecord.Reason.allCases.randomElement(using: &random)! {
                case .fieldCount: fields = 3
                case .id: id = "1O" + id.dropFirst(2)  // a letter O for a zero
                case .customer: customer = ""
                case .amount: amount += "x"
                case .currency: currency = "XBT"
                }
            }
            return RawRecord(line: line, text: [id, customer, amount, currency].prefix(fields).joined(separator: ","))
        }
    }

    func makeAsyncIterator() -> AsyncIterator {
        AsyncIterator(source: self, random: SplitMix64(seed: seed))
    }
}

// MARK: - The simulated downstream service

/// The service the enrich stage calls: a customer look-up that takes 1–2 ms, fails with
/// probability `failureRate` (after its latency) and hangs for `hang` (longer than the
/// caller's timeout) with probability `slowRate`. The outcome of each try on each record is
/// drawn from `seed`, so runs are reproducible.
struct Downstream: Sendable {
    var failureRate: Double
    var slowRate: Double
    var hang: Duration
    var seed: UInt64

    func lookUp(_ customer: String, line: Int, attempt: Int) async throws -> Customer {
        var random = SplitMix64(seed: seed &+ UInt64(line) &* 16 &+ UInt64(attempt))
        let roll = Double.random(in: 0..<1, using: &random)
        if roll < slowRate {
            try await Task.sleep(for: hang)  // the caller's timeout cancels this
        } else {
            try await Task.sleep(for: .microseconds(Int.random(in: 1_000...2_000, using: &random)))
        }
        if roll < slowRate + failureRate { throw DownstreamUnavailable() }
        let number = Int(customer.dropFirst(2)) ?? 0
        return Customer(
            tier: number % 10 == 0 ? .gold : number % 10 < 4 ? .silver : .bronze,
            region: ["eu-west", "eu-north", "us-east", "ap-south"][number % 4])
    }
}

/// A downstream call that failed (the service's 503).
struct DownstreamUnavailable: Error, CustomStringConvertible {
    var description: String { "downstream unavailable (503)" }
}

// MARK: - Accounting

/// The records each stage left out, and why.
///
/// A stage's ``StageStats/skipped`` counts the records it left out and its `recentErrors`
/// keeps the last 64 errors; to count *every* reason, each try of a stage's work goes through
/// ``attempt(_:line:_:)``, which keeps a record's last error until a later try succeeds.
/// What is left at the end is the records left out, each with the error of its last try.
final class FailureLedger: Sendable {
    private struct Key: Hashable {
        var stage: String
        var line: Int
    }

    private struct Failure {
        var tries: Int
        var reason: String
    }

    private let failures = Mutex<[Key: Failure]>([:])

    /// Runs one try of `stage`'s work on the record at `line`, passing the try's number (1
    /// for the first); a failure is noted, a success forgets the earlier failures.
    func attempt<Value>(_ stage: String, line: Int, _ work: (_ attempt: Int) async throws -> Value) async throws -> Value {
        let key = Key(stage: stage, line: line)
        let attempt = (failures.withLock { $0[key]?.tries } ?? 0) + 1
        do {
            let value = try await work(attempt)
            if attempt > 1 { _ = failures.withLock { $0.removeValue(forKey: key) } }
            return value
        } catch {
            let failure = Failure(tries: attempt, reason: Self.reason(for: error, tries: attempt))
            failures.withLock { $0[key] = failure }
            throw error
        }
    }

    /// How many records `stage` left out, by reason.
    func leftOut(_ stage: String) -> [String: Int] {
        failures.withLock { failures in
            var reasons: [String: Int] = [:]
            for (key, failure) in failures where key.stage == stage { reasons[failure.reason, default: 0] += 1 }
            return reasons
        }
    }

    private static func reason(for error: any Error, tries: Int) -> String {
        let after = tries > 1 ? " after \(tries) tries" : ""
        switch error {
        case let error as MalformedRecord: return error.reason.rawValue
        case is TimeoutError: return "timed out (TimeoutError)" + after
        case let error as DownstreamUnavailable: return "\(error)" + after
        default: return "\(type(of: error))" + after
        }
    }
}

/// The line numbers the batcher reported for the lines written, and whether the consumer is
/// done.
final class WrittenLines: Sendable {
    private struct State {
        var seen: [Bool]
        var count = 0
        var isContiguous = true
        var finishedAt: ContinuousClock.Instant?
    }

    private let state: Mutex<State>

    init(records: Int) {
        state = Mutex(State(seen: Array(repeating: false, count: records + 1)))
    }

    /// A line was written at `lineNumber` (from 1).
    func written(lineNumber: Int) {
        state.withLock { state in
            state.count += 1
            if state.seen.indices.contains(lineNumber), lineNumber > 0, !state.seen[lineNumber] {
                state.seen[lineNumber] = true
            } else {
                state.isContiguous = false  // out of range, or twice
            }
        }
    }

    /// The consumer is done: every line it enqueued is written (or it failed).
    func finish() { state.withLock { $0.finishedAt = .now } }

    var count: Int { state.withLock { $0.count } }
    var finishedAt: ContinuousClock.Instant? { state.withLock { $0.finishedAt } }
    var isFinished: Bool { finishedAt != nil }

    /// Whether the line numbers were exactly 1...count, each once.
    var isContiguous: Bool {
        state.withLock { state in state.isContiguous && !state.seen[1...].prefix(state.count).contains(false) }
    }
}

/// The batcher's tickets for the lines enqueued and not yet awaited, oldest first: a ring of
/// `capacity`.
struct TicketRing<Output: Sendable> {
    private var slots: [BatchTicket<Output>?]
    private var head = 0
    private var count = 0

    init(capacity: Int) {
        slots = Array(repeating: nil, count: capacity)
    }

    /// Adds `ticket`; when the ring was full, first takes out and returns the oldest.
    mutating func append(_ ticket: BatchTicket<Output>) -> BatchTicket<Output>? {
        let oldest = count == slots.count ? removeFirst() : nil
        slots[(head + count) % slots.count] = ticket
        count += 1
        return oldest
    }

    /// Takes out the oldest ticket, if any.
    mutating func removeFirst() -> BatchTicket<Output>? {
        guard count > 0 else { return nil }
        defer {
            slots[head] = nil
            head = (head + 1) % slots.count
            count -= 1
        }
        return slots[head]
    }
}

// MARK: - The output file

/// The output file, written a batch at a time: one `fwrite` and one `fflush` a batch.
final class OutputFile: Sendable {
    private struct State {
        var stream: UnsafeMutablePointer<FILE>?
        var lines = 0
    }

    let path: String
    private let state: Mutex<State>

    /// Creates the file, or empties it.
    init(path: String) throws {
        guard let stream = fopen(path, "w") else { throw OutputFileError(path: path, operation: "open", code: errno) }
        self.path = path
        state = Mutex(State(stream: stream))
    }

    /// Appends `lines`, each followed by a newline.
    ///
    /// - Returns: The number of each line in the file, from 1.
    func append(_ lines: [String]) throws -> [Int] {
        guard !lines.isEmpty else { return [] }
        var text = lines.joined(separator: "\n")
        text.append("\n")
        return try state.withLock { state throws(OutputFileError) in
            guard let stream = state.stream else { throw OutputFileError(path: path, operation: "write (closed)", code: EBADF) }
            let expected = text.utf8.count
            let written = text.withUTF8 { fwrite($0.baseAddress, 1, $0.count, stream) }
            guard written == expected, fflush(stream) == 0 else { throw OutputFileError(path: path, operation: "write", code: errno) }
            let first = state.lines + 1
            state.lines += lines.count
            return Array(first...state.lines)
        }
    }

    func close() throws {
        try state.withLock { state throws(OutputFileError) in
            guard let stream = state.stream else { return }
            state.stream = nil
            guard fclose(stream) == 0 else { throw OutputFileError(path: path, operation: "close", code: errno) }
        }
    }

    /// The newlines in the file at `path`, read back from the disk.
    static func countLines(atPath path: String) throws -> Int {
        guard let stream = fopen(path, "r") else { throw OutputFileError(path: path, operation: "open", code: errno) }
        defer { fclose(stream) }
        var buffer = [UInt8](repeating: 0, count: 64 * 1024)
        var lines = 0
        while true {
            let read = buffer.withUnsafeMutableBytes { fread($0.baseAddress, 1, $0.count, stream) }
            if read == 0 { break }
            lines += buffer[..<read].reduce(0) { $1 == UInt8(ascii: "\n") ? $0 + 1 : $0 }
        }
        guard ferror(stream) == 0 else { throw OutputFileError(path: path, operation: "read", code: errno) }
        return lines
    }
}

/// A failed operation on the output file.
struct OutputFileError: Error, CustomStringConvertible {
    var path: String
    var operation: String
    var code: Int32

    var description: String { "cannot \(operation) \(path): \(String(cString: strerror(code)))" }
}
