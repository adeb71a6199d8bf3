#if canImport(Darwin)
import Darwin
#elseif canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// One armed deadline: what ``withDeadline(_:_:)`` registers with the shared timer.
///
/// Subclasses say what happens when it fires (`fire()`); the timer calls it at most once,
/// after releasing its lock. `expired` is set before `fire()` runs, so anything that
/// observes the cancellation `fire()` causes also observes `expired == true`.
@usableFromInline
class DeadlineScope: @unchecked Sendable {
    // @unchecked Sendable: `deadline` is immutable; `heapIndex`, `expiredFlag` and
    // `isFiring` are guarded by `DeadlineTimer.shared`'s mutex.
    @usableFromInline let deadline: ContinuousClock.Instant
    /// Guarded by the timer's lock.
    var heapIndex = -1
    /// Guarded by the timer's lock: set when the deadline passed.
    var expiredFlag = false
    /// Guarded by the timer's lock: `fire()` is running (the scope is out of the heap).
    var isFiring = false

    @usableFromInline
    init(deadline: ContinuousClock.Instant) {
        self.deadline = deadline
    }

    /// Whether this scope's deadline has passed and the timer fired it.
    @usableFromInline
    var isExpired: Bool {
        DeadlineTimer.shared.withLock { expiredFlag }
    }

    /// Called by the timer thread, without any lock held, once the deadline has passed.
    @usableFromInline
    func fire() {}

    /// Whether this scope's timer cancels the current task when the deadline passes, so that
    /// a nested scope with a later deadline may rely on it and run inline. False unless the
    /// subclass knows its task.
    @usableFromInline
    var cancelsCurrentTask: Bool { false }
}

/// The process-wide timer behind every Corral deadline: one thread, one min-heap.
///
/// Arming a deadline is a heap insertion under a lock, disarming a removal; no task and no
/// timer is created per deadline, and the thread is woken only when a new deadline is
/// earlier than the one it sleeps until. It is started on first use and then sleeps
/// without a deadline while none is armed.
///
/// It has its own `pthread_mutex_t` (not a ``LockedState``) because it waits on a
/// condition variable with it, which `os_unfair_lock` cannot do.
@usableFromInline
final class DeadlineTimer: @unchecked Sendable {
    // @unchecked Sendable: `mutex` and `condition` are allocated once and never freed;
    // `heap`, `sleepingUntil`, `threadStarted` (and every `DeadlineScope`'s `heapIndex`
    // and `expiredFlag`) are read and written only with `mutex` held.
    @usableFromInline static let shared = DeadlineTimer()

    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    private let condition: UnsafeMutablePointer<pthread_cond_t>
    private var heap: [DeadlineScope] = []
    /// The instant the timer thread sleeps until; `nil` while it waits without a deadline.
    private var sleepingUntil: ContinuousClock.Instant?
    private var threadStarted = false

    private init() {
        mutex = .allocate(capacity: 1)
        mutex.initialize(to: pthread_mutex_t())
        pthread_mutex_init(mutex, nil)
        condition = .allocate(capacity: 1)
        condition.initialize(to: pthread_cond_t())
        #if canImport(Darwin)
        pthread_cond_init(condition, nil)
        #else
        var attributes = pthread_condattr_t()
        pthread_condattr_init(&attributes)
        pthread_condattr_setclock(&attributes, CLOCK_MONOTONIC)
        pthread_cond_init(condition, &attributes)
        pthread_condattr_destroy(&attributes)
        #endif
    }

    /// Runs `body` with the timer's lock held.
    func withLock<Result>(_ body: () throws -> Result) rethrows -> Result {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body()
    }

    /// Arms `scope`; its `fire()` is called once its deadline has passed, unless it is
    /// disarmed first.
    @usableFromInline
    func arm(_ scope: DeadlineScope) {
        let mustSignal: Bool = withLock {
            if !threadStarted {
                threadStarted = true
                startThread()
            }
            scope.heapIndex = heap.count
            heap.append(scope)
            siftUp(scope.heapIndex)
            guard scope.heapIndex == 0 else { return false }
            if let sleepingUntil, sleepingUntil <= scope.deadline { return false }
            return true
        }
        if mustSignal {
            pthread_cond_signal(condition)
        }
    }

    /// Disarms `scope`. When this returns, `scope.fire()` has either run to completion or
    /// will never run: whatever `fire()` touches may be released.
    ///
    /// The timer thread is not woken: at worst it wakes at the old earliest deadline, finds
    /// nothing due and sleeps again.
    @usableFromInline
    func disarm(_ scope: DeadlineScope) {
        while true {
            let firing: Bool = withLock {
                if scope.heapIndex >= 0 {
                    remove(at: scope.heapIndex)
                }
                return scope.isFiring
            }
            guard firing else { return }
            sched_yield()  // rare: the deadline passed just as the scope ended
        }
    }

    // MARK: - The thread

    private func startThread() {
        let context = Unmanaged.passRetained(self).toOpaque()
        #if canImport(Darwin)
        var thread: pthread_t? = nil
        #else
        var thread = pthread_t()
        #endif
        let status = pthread_create(&thread, nil, { context in
            #if canImport(Darwin)
            let timer = Unmanaged<DeadlineTimer>.fromOpaque(context).takeRetainedValue()
            #else
            let timer = Unmanaged<DeadlineTimer>.fromOpaque(context!).takeRetainedValue()
            #endif
            timer.loop()
        }, context)
        precondition(status == 0, "Corral: could not start its deadline timer thread (pthread_create: \(status))")
        #if canImport(Darwin)
        pthread_detach(thread!)
        #else
        pthread_detach(thread)
        #endif
    }

    private func loop() -> Never {
        var due: [DeadlineScope] = []
        pthread_mutex_lock(mutex)
        while true {
            let now = ContinuousClock.now
            while let first = heap.first, first.deadline <= now {
                remove(at: 0)
                first.expiredFlag = true
                first.isFiring = true
                due.append(first)
            }
            if !due.isEmpty {
                pthread_mutex_unlock(mutex)
                for scope in due { scope.fire() }
                pthread_mutex_lock(mutex)
                for scope in due { scope.isFiring = false }
                due.removeAll(keepingCapacity: true)
                continue
            }
            if let first = heap.first {
                sleepingUntil = first.deadline
                var wakeAt = timespec.after(now.duration(to: first.deadline))
                pthread_cond_timedwait(condition, mutex, &wakeAt)
            } else {
                sleepingUntil = nil
                pthread_cond_wait(condition, mutex)
            }
        }
    }

    // MARK: - The heap (called with `mutex` held)

    private func siftUp(_ index: Int) {
        var child = index
        while child > 0 {
            let parent = (child - 1) / 2
            guard heap[child].deadline < heap[parent].deadline else { break }
            swapAt(child, parent)
            child = parent
        }
    }

    private func siftDown(_ index: Int) {
        var parent = index
        while true {
            let left = 2 * parent + 1
            guard left < heap.count else { return }
            let right = left + 1
            var smallest = left
            if right < heap.count && heap[right].deadline < heap[left].deadline { smallest = right }
            guard heap[smallest].deadline < heap[parent].deadline else { return }
            swapAt(parent, smallest)
            parent = smallest
        }
    }

    private func remove(at index: Int) {
        let removed = heap[index]
        let last = heap.count - 1
        if index != last {
            swapAt(index, last)
        }
        heap.removeLast()
        removed.heapIndex = -1
        if index < heap.count {
            siftDown(index)
            siftUp(index)
        }
    }

    private func swapAt(_ i: Int, _ j: Int) {
        heap.swapAt(i, j)
        heap[i].heapIndex = i
        heap[j].heapIndex = j
    }
}

extension timespec {
    /// The `CLOCK_MONOTONIC` time `duration` from now (the clock the timer's condition
    /// variable waits on; on Darwin, where it waits on the wall clock, `CLOCK_REALTIME`).
    static func after(_ duration: Duration) -> timespec {
        var time = timespec()
        #if canImport(Darwin)
        clock_gettime(CLOCK_REALTIME, &time)
        #else
        clock_gettime(CLOCK_MONOTONIC, &time)
        #endif
        let (seconds, attoseconds) = duration.components
        guard seconds >= 0 && attoseconds >= 0 else { return time }
        var nanoseconds = Int(time.tv_nsec) + Int(attoseconds / 1_000_000_000)
        var wholeSeconds = Int(time.tv_sec) + Int(min(seconds, 1 << 40))
        if nanoseconds >= 1_000_000_000 {
            nanoseconds -= 1_000_000_000
            wholeSeconds += 1
        }
        time.tv_sec = .init(wholeSeconds)
        time.tv_nsec = .init(nanoseconds)
        return time
    }
}
