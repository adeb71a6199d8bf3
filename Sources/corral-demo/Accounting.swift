import Corral
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

// What the pipeline and service scenarios keep to account for every record: the reasons
// records were left out, the line numbers written, the results outstanding, and the output
// file itself.

// MARK: - Accounting

/// The records each stage left out, and why.
///
/// A stage's ``StageStats/skipped`` counts the records it left out and its `recentErrors`
/// keeps the last 64 errors; to count *every* reason, each try of a stage's work goes through
/// ``attempt(_:line:_:)``, which keeps a record's last error until a later try succeeds.
/// What is left at the end is the records left out, each with the error of its last try.
/// A try cut short by the stage's teardown (the pipeline cancelled) is not a failure: the
/// record was dropped, not left out, and the ledger forgets it. So is a failed try that
/// still had a retry to come (`maxTries`) when the pipeline was torn down during its
/// back-off: only a record's last try can leave it out. Failures outside a stage's tries (a
/// failed write) are noted with ``record(_:line:error:)``.
final class FailureLedger: Sendable {
    private struct Key: Hashable {
        var stage: String
        var line: Int
    }

    private struct Failure {
        var tries: Int
        var reason: String
        /// The stage will not try again: the record is left out (unless a retry is still to
        /// come, which a teardown may prevent: then it was dropped).
        var isFinal: Bool
    }

    private let failures = Mutex<[Key: Failure]>([:])

    /// Runs one try of `stage`'s work on the record at `line`, passing the try's number (1
    /// for the first); a failure is noted, a success forgets the earlier failures. `maxTries`
    /// is how many tries the stage's error policy makes before it leaves a record out.
    func attempt<Value>(
        _ stage: String, line: Int, maxTries: Int = 1, _ work: (_ attempt: Int) async throws -> Value
    ) async throws -> Value {
        let key = Key(stage: stage, line: line)
        let attempt = (failures.withLock { $0[key]?.tries } ?? 0) + 1
        do {
            let value = try await work(attempt)
            if attempt > 1 { _ = failures.withLock { $0.removeValue(forKey: key) } }
            return value
        } catch {
            if Task.isCancelled && (error is CancellationError || error is TimeoutError) {
                // Torn down (as the stage's own policy sees it): dropped, not failed.
                _ = failures.withLock { $0.removeValue(forKey: key) }
            } else {
                let failure = Failure(
                    tries: attempt, reason: Self.reason(for: error, tries: attempt), isFinal: attempt >= maxTries)
                failures.withLock { $0[key] = failure }
            }
            throw error
        }
    }

    /// Notes that the record at `line` failed in `stage` with `error`, for good.
    func record(_ stage: String, line: Int, error: any Error) {
        let failure = Failure(tries: 1, reason: Self.reason(for: error, tries: 1), isFinal: true)
        failures.withLock { $0[Key(stage: stage, line: line)] = failure }
    }

    /// How many records `stage` left out, by reason.
    func leftOut(_ stage: String) -> [String: Int] {
        failures.withLock { failures in
            var reasons: [String: Int] = [:]
            for (key, failure) in failures where key.stage == stage && failure.isFinal {
                reasons[failure.reason, default: 0] += 1
            }
            return reasons
        }
    }

    private static func reason(for error: any Error, tries: Int) -> String {
        let after = tries > 1 ? " after \(tries) tries" : ""
        switch error {
        case let error as MalformedRecord: return error.reason.rawValue
        case is TimeoutError: return "timed out (TimeoutError)" + after
        case let error as DownstreamUnavailable: return "\(error)" + after
        case let error as BatcherError: return "\(error)"
        case let error as PoolError: return "\(error)"
        case let error as OutputFileError: return "\(error)"
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

/// Results not yet awaited — the batcher's tickets for the lines enqueued, or a pool's job
/// handles — oldest first: a ring of `capacity`.
struct PendingRing<Element> {
    private var slots: [Element?]
    private var head = 0
    private var count = 0

    init(capacity: Int) {
        slots = Array(repeating: nil, count: capacity)
    }

    /// Adds `element`; when the ring was full, first takes out and returns the oldest.
    mutating func append(_ element: Element) -> Element? {
        let oldest = count == slots.count ? removeFirst() : nil
        slots[(head + count) % slots.count] = element
        count += 1
        return oldest
    }

    /// Takes out the oldest element, if any.
    mutating func removeFirst() -> Element? {
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

/// `name` in the temporary directory (`$TMPDIR`, or `/tmp`).
func temporaryFilePath(_ name: String) -> String {
    let directory = getenv("TMPDIR").map { String(cString: $0) }.flatMap { $0.isEmpty ? nil : $0 } ?? "/tmp"
    return (directory.hasSuffix("/") ? directory : directory + "/") + name
}

/// The output file, written a batch at a time: one `write` a batch, straight to the file
/// descriptor. A batch is appended whole or not at all: if a write fails part-way (disk full,
/// file too large), the file is cut back to its last whole batch, so that its lines are exactly
/// those of the batches reported written.
final class OutputFile: Sendable {
    private struct State {
        var descriptor: Int32?
        var lines = 0
        /// The file's size: the bytes of the batches written.
        var bytes = 0
    }

    let path: String
    private let state: Mutex<State>

    /// Creates the file, or empties it.
    init(path: String) throws {
        let descriptor = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard descriptor >= 0 else { throw OutputFileError(path: path, operation: "open", code: errno) }
        self.path = path
        state = Mutex(State(descriptor: descriptor))
    }

    /// Appends `lines`, each followed by a newline: all of them, or (if it throws) none.
    ///
    /// - Returns: The number of each line in the file, from 1.
    func append(_ lines: [String]) throws -> [Int] {
        guard !lines.isEmpty else { return [] }
        var text = lines.joined(separator: "\n")
        text.append("\n")
        return try state.withLock { state throws(OutputFileError) in
            guard let descriptor = state.descriptor else { throw OutputFileError(path: path, operation: "write (closed)", code: EBADF) }
            let failure: Int32? = text.withUTF8 { bytes in
                var done = 0
                while done < bytes.count {
                    let written = write(descriptor, bytes.baseAddress! + done, bytes.count - done)
                    if written < 0 {
                        if errno == EINTR { continue }
                        return errno
                    }
                    done += written
                }
                return nil
            }
            if let failure {
                // Take back what part of the batch was written (best effort: if this fails too,
                // the count of lines read back from the file will show it).
                _ = ftruncate(descriptor, off_t(state.bytes))
                _ = lseek(descriptor, off_t(state.bytes), SEEK_SET)
                throw OutputFileError(path: path, operation: "write", code: failure)
            }
            state.bytes += text.utf8.count
            let first = state.lines + 1
            state.lines += lines.count
            return Array(first...state.lines)
        }
    }

    func close() throws {
        try state.withLock { state throws(OutputFileError) in
            guard let descriptor = state.descriptor else { return }
            state.descriptor = nil
            guard closeDescriptor(descriptor) == 0 else { throw OutputFileError(path: path, operation: "close", code: errno) }
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

/// `close(2)` (the name is taken, inside ``OutputFile``, by its own `close()`).
private func closeDescriptor(_ descriptor: Int32) -> Int32 {
    close(descriptor)
}

/// A failed operation on the output file.
struct OutputFileError: Error, CustomStringConvertible {
    var path: String
    var operation: String
    var code: Int32

    var description: String { "cannot \(operation) \(path): \(String(cString: strerror(code)))" }
}
