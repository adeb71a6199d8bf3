/// The state of a ``TaskTracker``.
///
/// | event                 | condition                              | effect |
/// |-----------------------|----------------------------------------|--------|
/// | `spawnRequested`      | closed                                 | `.closed` |
/// |                       | fewer than `limit` live                | reserve a slot (`live += 1`), `.admitted(id)` |
/// |                       | otherwise                              | the spawner parks |
/// | `taskCreated(id, t)`  | slot still reserved                    | keep the handle (cancelled at once if `cancelAll` came meanwhile) |
/// |                       | task already finished                  | drop it |
/// | `taskFinished(id)`    | —                                      | free the slot; admit the first parked spawner; if closed and none live, wake the waiters |
/// | `closeRequested`      | —                                      | parked spawners fail with `.closed`; if none live, wake the waiters |
/// | `cancelAllRequested`  | —                                      | every live task is cancelled (also those being created) |
///
/// Finished tasks leave `handles` at once, so it never holds more than `limit` entries:
/// a million spawned-and-finished tasks leave nothing behind.
struct TaskTrackerStateMachine {
    enum SpawnOutcome: Sendable {
        case admitted(UInt64)
        case closed
        case cancelled
    }

    enum SpawnAction {
        case admitted(UInt64)
        case suspend(WaiterID)
        case closed
    }

    struct Slot {
        var task: Task<Void, Never>?
        /// `cancelEpoch` when the slot was reserved: a `cancelAll` after it cancels the task.
        var epoch: UInt64
    }

    let limit: Int
    private(set) var live = 0
    private(set) var handles: [UInt64: Slot] = [:]
    private var nextID: UInt64 = 0
    private var cancelEpoch: UInt64 = 0
    private(set) var isClosed = false
    private(set) var spawners = WaiterQueue<Void, SpawnOutcome>()
    private(set) var waiters = WaiterQueue<Void, Bool>()
    private(set) var spawned = 0
    private(set) var errors: [any Error] = []
    private(set) var errorCount = 0

    /// How many errors ``errors`` keeps (the most recent); ``errorCount`` counts them all.
    static let keptErrors = 1_000

    init(limit: Int) {
        self.limit = limit
    }

    mutating func spawnRequested() -> SpawnAction {
        if isClosed { return .closed }
        if live < limit && spawners.isEmpty { return .admitted(admit()) }
        return .suspend(spawners.enqueue(()))
    }

    mutating func trySpawnRequested() -> UInt64? {
        guard !isClosed && live < limit && spawners.isEmpty else { return nil }
        return admit()
    }

    private mutating func admit() -> UInt64 {
        live += 1
        spawned += 1
        nextID += 1
        handles[nextID] = Slot(task: nil, epoch: cancelEpoch)
        return nextID
    }

    mutating func spawnerSuspended(_ id: WaiterID, _ continuation: UnsafeContinuation<SpawnOutcome, Never>) -> Resumption<SpawnOutcome>? {
        spawners.suspend(id, continuation: continuation)
    }

    mutating func spawnerCancelled(_ id: WaiterID) -> Resumptions<SpawnOutcome> {
        spawners.cancel(id, with: .cancelled)
    }

    /// Returns `true` if the task must be cancelled at once (a `cancelAll` came while it was
    /// being created).
    mutating func taskCreated(_ id: UInt64, _ task: Task<Void, Never>) -> Bool {
        guard let slot = handles[id] else { return false }  // already finished
        handles[id] = Slot(task: task, epoch: slot.epoch)
        return slot.epoch < cancelEpoch
    }

    mutating func taskFinished(_ id: UInt64) -> (Resumption<SpawnOutcome>?, Resumptions<Bool>) {
        handles.removeValue(forKey: id)
        live -= 1
        var admitted: Resumption<SpawnOutcome>?
        if !isClosed, live < limit, let first = spawners.first {
            let slot = admit()
            admitted = spawners.settle(first.id, with: .admitted(slot))?.resumption
        }
        return (admitted, wakeWaitersIfDone())
    }

    mutating func taskFailed(_ error: any Error) {
        errorCount += 1
        errors.append(error)
        if errors.count > Self.keptErrors { errors.removeFirst(errors.count - Self.keptErrors) }
    }

    mutating func closeRequested() -> (Resumptions<SpawnOutcome>, Resumptions<Bool>) {
        isClosed = true
        var refused = Resumptions<SpawnOutcome>()
        for spawner in spawners.settleAll(with: .closed) {
            refused.append(spawner.resumption)
        }
        return (refused, wakeWaitersIfDone())
    }

    mutating func cancelAllRequested() -> [Task<Void, Never>] {
        cancelEpoch += 1
        return handles.values.compactMap(\.task)
    }

    mutating func waitRequested() -> WaiterID? {
        if isClosed && live == 0 { return nil }
        return waiters.enqueue(())
    }

    mutating func waiterSuspended(_ id: WaiterID, _ continuation: UnsafeContinuation<Bool, Never>) -> Resumption<Bool>? {
        waiters.suspend(id, continuation: continuation)
    }

    mutating func waiterCancelled(_ id: WaiterID) -> Resumptions<Bool> {
        waiters.cancel(id, with: false)
    }

    private mutating func wakeWaitersIfDone() -> Resumptions<Bool> {
        var woken = Resumptions<Bool>()
        guard isClosed && live == 0 else { return woken }
        for waiter in waiters.settleAll(with: true) {
            woken.append(waiter.resumption)
        }
        return woken
    }
}
