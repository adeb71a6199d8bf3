/// Counts the tasks Corral starts inside a scope, by the structure that started them, so
/// that a test can prove none outlived the scope (CorralTesting's `expectNoLeakedTasks`).
///
/// A ledger is bound as a task-local value; every Corral structure that starts a task
/// (error-group workers and tasks, `concurrentMap` workers, `TaskTracker` tasks, deadline
/// bodies, and pool workers and pipeline stages as they arrive) looks it up and records the
/// task's start and end.
/// Each test binds its own ledger, so parallel tests never see each other's tasks, and code
/// running outside any ledger pays one task-local lookup per task it starts.
public final class TaskLedger: Sendable {
    /// A kind of Corral structure and its name, e.g. `("ErrorGroup", "fetch pages")`.
    public struct Owner: Hashable, Sendable, CustomStringConvertible {
        /// The structure's type, e.g. `"ErrorGroup"` or `"TaskTracker"`.
        public var kind: String
        /// The name the structure was given, or its default (`"withErrorGroup"`,
        /// `"TaskTracker"`, `"withDeadline"`, `"workers"` for `concurrentMap`).
        public var name: String

        /// Creates an owner.
        public init(kind: String, name: String) {
            self.kind = kind
            self.name = name
        }

        /// `kind "name"`.
        public var description: String { "\(kind) \"\(name)\"" }
    }

    private let live = LockedState<[Owner: Int]>([:])

    /// Creates an empty ledger.
    public init() {}

    /// The ledger bound to the current task, if any.
    @TaskLocal public static var current: TaskLedger?

    /// Tasks that have started and not finished, by owner (owners with none are omitted).
    public var liveTasks: [Owner: Int] {
        live.withLock { $0 }
    }

    /// The number of tasks that have started and not finished.
    public var liveTaskCount: Int {
        live.withLock { $0.values.reduce(0, +) }
    }

    func taskStarted(_ owner: Owner) {
        live.withLock { $0[owner, default: 0] += 1 }
    }

    func taskFinished(_ owner: Owner) {
        live.withLock { live in
            guard let count = live[owner] else {
                preconditionFailure("TaskLedger: \(owner) finished a task it never started")
            }
            live[owner] = count == 1 ? nil : count - 1
        }
    }
}

/// The ledger entry of one task a structure is about to start: captures the current ledger
/// (if any) at the start, and must be closed exactly once when the task ends.
@usableFromInline
struct LedgerEntry: Sendable {
    @usableFromInline let ledger: TaskLedger?
    @usableFromInline let owner: TaskLedger.Owner?

    /// Records a task of `owner` starting in the current task's ledger (a no-op outside any).
    @usableFromInline
    init(kind: String, name: String) {
        guard let ledger = TaskLedger.current else {
            self.ledger = nil
            self.owner = nil
            return
        }
        let owner = TaskLedger.Owner(kind: kind, name: name)
        ledger.taskStarted(owner)
        self.ledger = ledger
        self.owner = owner
    }

    /// Records the task's end.
    @usableFromInline
    func close() {
        if let ledger, let owner { ledger.taskFinished(owner) }
    }
}
