/// Live diagnostics of Corral structures: a "goroutine dump" for Corral.
///
/// ```swift
/// CorralDiagnostics.track(quota, name: "api-quota")          // semaphores, channels, trackers,
/// CorralDiagnostics.track(jobs, name: "jobs")                // pipelines: opt in, by name
/// print(CorralDiagnostics.snapshot().table)                  // pools and batchers are tracked from their creation
/// ```
///
/// ```text
/// kind            name        tasks  waiting  held  progress  stalled for
/// WorkerPool      thumbnails      8        3    64     10482  -
/// AsyncSemaphore  api-quota       -       12     -        -   2.4 s
/// ```
///
/// Every ``WorkerPool`` and ``Batcher`` is in the registry from its creation until it is
/// deallocated; semaphores, channels, task trackers and pipelines join with `track`. The
/// registry holds them weakly: tracking never keeps a structure alive.
///
/// ## Stalls
/// A structure is *stalled* when something waits in it (a queued job, a parked sender, a
/// semaphore waiter, an element in flight) and it has made no progress (no job finished, the
/// head of the line was not served, no element passed) since an earlier snapshot. Each
/// snapshot reports for how long that has been so (``StructureSnapshot/stalledFor``), at the
/// resolution of how often snapshots are taken: the troubleshooting table's "goroutine count
/// keeps growing" and "channel blocked, no response", made visible. This needs no clock
/// reading on any hot path. ``detectStalls(threshold:every:report:)`` takes snapshots
/// periodically and reports each stall once.
public enum CorralDiagnostics {
    /// Adds a semaphore to the registry under `name`, until it is deallocated.
    public static func track(_ semaphore: AsyncSemaphore, name: String) {
        DiagnosticsRegistry.shared.add(semaphore, kind: "AsyncSemaphore", name: name) { semaphore in
            let waiters = semaphore.waiters
            return StructureSample(
                tasks: nil, waiting: waiters, held: nil, progress: nil,
                stallToken: semaphore.headWaiterToken.map { Int(truncatingIfNeeded: $0) },
                details: ["capacity": semaphore.capacity, "availablePermits": semaphore.availablePermits, "waiters": waiters]
            )
        }
    }

    /// Adds a channel to the registry under `name`, until it is deallocated. Its waiting
    /// count is its senders waiting for room (receivers waiting for elements are idle, not
    /// stuck).
    public static func track<Element>(_ channel: BoundedChannel<Element>, name: String) {
        DiagnosticsRegistry.shared.add(channel, kind: "BoundedChannel", name: name) { channel in
            let senders = channel.waitingSenders
            return StructureSample(
                tasks: nil, waiting: senders, held: channel.count, progress: nil,
                stallToken: channel.headSenderToken.map { Int(truncatingIfNeeded: $0) },
                details: [
                    "capacity": channel.capacity, "buffered": channel.count,
                    "waitingSenders": senders, "waitingReceivers": channel.waitingReceivers,
                ]
            )
        }
    }

    /// Adds a task tracker to the registry, until it is deallocated.
    public static func track(_ tracker: TaskTracker) {
        DiagnosticsRegistry.shared.add(tracker, kind: "TaskTracker", name: tracker.name) { tracker in
            let count = tracker.count
            return StructureSample(
                tasks: count, waiting: 0, held: nil, progress: nil, stallToken: nil,
                details: ["limit": tracker.limit, "tasks": count, "errors": tracker.errorCount, "closed": tracker.isClosed ? 1 : 0]
            )
        }
    }

    /// Adds every stage of a pipeline to the registry under `pipeline`, until the stage
    /// `last` (and so the pipeline) is deallocated.
    public static func track<Base, Output>(pipeline: String, _ last: PipelineStage<Base, Output>) {
        let stages = last.pipelineCounters.map { WeakReference($0) }  // weakly: tracking keeps nothing alive
        DiagnosticsRegistry.shared.add(last.counters) { _ in
            // Stages that share a name are told apart by a suffix (`step`, `step#2`): one
            // row, and one stall report, per stage.
            var seen: [String: Int] = [:]
            return stages.compactMap { $0.object?.snapshot }.map { stage in
                let finished = stage.emitted + stage.skipped
                seen[stage.name, default: 0] += 1
                let occurrence = seen[stage.name]!
                let name = occurrence == 1 ? stage.name : "\(stage.name)#\(occurrence)"
                return (
                    kind: "PipelineStage", name: "\(pipeline)/\(name)",
                    sample: StructureSample(
                        tasks: nil, waiting: stage.inFlight, held: stage.inFlight, progress: finished,
                        stallToken: finished,
                        details: [
                            "received": stage.received, "emitted": stage.emitted, "skipped": stage.skipped,
                            "retried": stage.retried, "inFlight": stage.inFlight,
                        ]
                    )
                )
            }
        }
    }

    /// Every tracked structure's state now, with how long each has been stalled.
    public static func snapshot() -> DiagnosticsSnapshot {
        DiagnosticsRegistry.shared.snapshot(at: .now)
    }

    /// Takes a snapshot `every` interval and calls `report` for each structure that has been
    /// stalled for at least `threshold` — once per stall (again only after it made progress
    /// and stalled anew). Returns when the calling task is cancelled.
    ///
    /// Run it as a child task of the code that owns the structures (or from a `Service`).
    ///
    /// - Precondition: `threshold >= .zero`, `every > .zero`.
    public static func detectStalls(
        threshold: Duration,
        every interval: Duration,
        report: @Sendable (StructureSnapshot) -> Void
    ) async {
        precondition(threshold >= .zero, "CorralDiagnostics.detectStalls(threshold:): threshold must not be negative, got \(threshold)")
        precondition(interval > .zero, "CorralDiagnostics.detectStalls(every:): the interval must be greater than 0, got \(interval)")
        var reporter = StallReporter(threshold: threshold)
        while !Task.isCancelled {
            for structure in reporter.newStalls(in: snapshot()) {
                report(structure)
            }
            do {
                try await Task.sleep(for: interval)
            } catch {
                return
            }
        }
    }
}

/// Decides which stalls of successive snapshots are new: a structure stalled for at least
/// `threshold` is reported once per stall.
///
/// A stall is new when the structure was not stalled (past the threshold) in the previous
/// snapshot, or when its `stalledFor` went *down*: it made progress and stalled again in
/// between. The second case matters because the stall clocks are shared by every caller of
/// `snapshot()`: another caller may have seen the progress, so this one never sees the
/// structure unstalled.
struct StallReporter {
    let threshold: Duration
    /// The stalls reported (or still going on), by structure, with their last `stalledFor`.
    private var stalls: [String: Duration] = [:]

    init(threshold: Duration) {
        self.threshold = threshold
    }

    mutating func newStalls(in snapshot: DiagnosticsSnapshot) -> [StructureSnapshot] {
        var current: [String: Duration] = [:]
        var new: [StructureSnapshot] = []
        var seen: [String: Int] = [:]
        for structure in snapshot.structures {
            // (Structures that share kind, name and id are told apart by their order.)
            let base = "\(structure.kind)/\(structure.name)/\(structure.id)"
            seen[base, default: 0] += 1
            guard let stalledFor = structure.stalledFor, stalledFor >= threshold else { continue }
            let key = "\(base)#\(seen[base]!)"
            current[key] = stalledFor
            if let previous = stalls[key], previous <= stalledFor { continue }  // the same stall
            new.append(structure)
        }
        stalls = current
        return new
    }
}

/// One structure in a ``DiagnosticsSnapshot``.
public struct StructureSnapshot: Hashable, Sendable, Codable {
    /// The structure's kind: `"WorkerPool"`, `"Batcher"`, `"AsyncSemaphore"`,
    /// `"BoundedChannel"`, `"TaskTracker"`, `"PipelineStage"`.
    public var kind: String
    /// Its name (`"pipeline/stage"` for a stage).
    public var name: String
    /// Distinguishes structures of the same kind and name.
    public var id: Int
    /// Tasks it runs now (workers, tracked tasks, handler calls), where that applies.
    public var tasks: Int?
    /// What waits in it now: queued and running jobs, unfinished items, parked senders or
    /// semaphore waiters, elements in flight.
    public var waiting: Int
    /// Items it holds (queued jobs, buffered items or elements), where that applies.
    public var held: Int?
    /// A count that grows as it makes progress (jobs or items finished), where that applies.
    public var progress: Int?
    /// For how long something has waited in it without progress, as seen across snapshots;
    /// nil when it is not stalled (nothing waits, or it made progress since the last one).
    public var stalledFor: Duration?
    /// Its kind's own counters, by name.
    public var details: [String: Int]
}

/// The state of every tracked Corral structure at one moment.
public struct DiagnosticsSnapshot: Hashable, Sendable, Codable {
    /// The structures, by kind then name.
    public var structures: [StructureSnapshot]

    /// The stalled structures.
    public var stalled: [StructureSnapshot] {
        structures.filter { $0.stalledFor != nil }
    }

    /// A table for logs and terminals: kind, name, tasks, waiting, held, progress, stalled for.
    public var table: String {
        var rows = [["kind", "name", "tasks", "waiting", "held", "progress", "stalled for"]]
        for structure in structures {
            rows.append([
                structure.kind, structure.name,
                structure.tasks.map(String.init) ?? "-", String(structure.waiting),
                structure.held.map(String.init) ?? "-", structure.progress.map(String.init) ?? "-",
                structure.stalledFor.map(formatted) ?? "-",
            ])
        }
        let widths = (0..<rows[0].count).map { column in rows.map { $0[column].count }.max() ?? 0 }
        return rows.map { row in
            row.enumerated().map { column, cell in
                let padding = String(repeating: " ", count: widths[column] - cell.count)
                return column < 2 ? cell + padding : padding + cell  // names left, numbers right
            }.joined(separator: "  ")
        }.joined(separator: "\n")
    }

    private func formatted(_ duration: Duration) -> String {
        let milliseconds = duration / .milliseconds(1)
        return milliseconds < 1_000 ? "\(Int(milliseconds)) ms" : "\(Int(milliseconds / 100) / 10).\(Int(milliseconds / 100) % 10) s"
    }
}

// MARK: - The registry

/// What a tracked structure reports.
struct StructureSample {
    var tasks: Int?
    var waiting: Int
    var held: Int?
    var progress: Int?
    /// Changes when the structure makes progress (nil: no stall detection).
    var stallToken: Int?
    var details: [String: Int]
}

/// The process-wide registry behind ``CorralDiagnostics``.
final class DiagnosticsRegistry: Sendable {
    static let shared = DiagnosticsRegistry()

    private struct Entry {
        let id: Int
        let isAlive: @Sendable () -> Bool
        let sample: @Sendable () -> [(kind: String, name: String, sample: StructureSample)]?
    }

    /// Per structure (entry id and sub-name): the stall token last seen, and since when
    /// something has waited without it changing.
    private struct StallWatch {
        var token: Int?
        var since: ContinuousClock.Instant
    }

    /// One structure's stall watch: its entry, and its place among the entry's samples (two
    /// stages of a pipeline may share a name).
    private struct WatchKey: Hashable {
        var entry: Int
        var index: Int
    }

    private struct State {
        var entries: [Entry] = []
        var nextID = 0
        var watches: [WatchKey: StallWatch] = [:]
        /// When `entries` reaches this size, `add` drops the deallocated ones (so that a
        /// program creating many short-lived pools without taking snapshots stays flat).
        var purgeAt = 64
    }

    private let state = LockedState(State())

    /// Adds `object` (held weakly) as one structure; `sample` reads it while it lives.
    func add<Object: AnyObject & Sendable>(
        _ object: Object,
        kind: String,
        name: String,
        sample: @escaping @Sendable (Object) -> StructureSample
    ) {
        add(object) { object in [(kind, name, sample(object))] }
    }

    /// Adds `object` (held weakly) as the structures `samples` lists while it lives (a
    /// pipeline: one per stage).
    func add<Object: AnyObject & Sendable>(
        _ object: Object,
        samples: @escaping @Sendable (Object) -> [(kind: String, name: String, sample: StructureSample)]
    ) {
        let reference = WeakReference(object)
        state.withLock { state in
            if state.entries.count >= state.purgeAt {
                state.entries.removeAll { !$0.isAlive() }
                state.purgeAt = Swift.max(64, 2 * state.entries.count)
            }
            state.nextID += 1
            state.entries.append(Entry(id: state.nextID, isAlive: { reference.object != nil }) {
                reference.object.map(samples)
            })
        }
    }

    func snapshot(at now: ContinuousClock.Instant) -> DiagnosticsSnapshot {
        let entries = state.withLock { $0.entries }
        // Sample outside the registry's lock: each structure takes its own.
        var live: [Int: [(kind: String, name: String, sample: StructureSample)]] = [:]
        for entry in entries {
            if let samples = entry.sample() { live[entry.id] = samples }
        }
        return state.withLock { state in
            // Forget the structures found deallocated (not those added since the copy).
            let sampled = Set(entries.map(\.id))
            state.entries.removeAll { sampled.contains($0.id) && live[$0.id] == nil }
            var structures: [StructureSnapshot] = []
            // Watches of entries this snapshot did not sample (added since the copy) stay.
            var watches = state.watches.filter { !sampled.contains($0.key.entry) }
            for entry in entries {
                guard let samples = live[entry.id] else { continue }
                for (index, (kind, name, sample)) in samples.enumerated() {
                    let key = WatchKey(entry: entry.id, index: index)
                    var stalledFor: Duration?
                    if sample.waiting > 0, let token = sample.stallToken {
                        if let watch = state.watches[key], watch.token == token {
                            watches[key] = watch
                            stalledFor = watch.since.duration(to: now)
                        } else {
                            watches[key] = StallWatch(token: token, since: now)
                        }
                    }
                    structures.append(StructureSnapshot(
                        kind: kind, name: name, id: entry.id, tasks: sample.tasks, waiting: sample.waiting,
                        held: sample.held, progress: sample.progress, stalledFor: stalledFor, details: sample.details
                    ))
                }
            }
            state.watches = watches
            structures.sort { ($0.kind, $0.name, $0.id) < ($1.kind, $1.name, $1.id) }
            return DiagnosticsSnapshot(structures: structures)
        }
    }
}

/// A weak reference, sendable because its object is.
final class WeakReference<Object: AnyObject & Sendable>: Sendable {
    // Sendable: `object` is a `weak let`, set once at init (weak loads are atomic).
    weak let object: Object?

    init(_ object: Object) {
        self.object = object
    }
}
