extension WorkerPool {
    /// How a ``WorkerPool`` is sized and named.
    public struct Configuration: Sendable {
        /// How many workers the pool runs.
        public struct Workers: Hashable, Sendable, CustomStringConvertible {
            @usableFromInline
            enum Base: Hashable, Sendable {
                case fixed(Int)
                case elastic(min: Int, max: Int, idleTimeout: Duration)
            }

            @usableFromInline let base: Base

            /// Exactly `count` workers, started when ``WorkerPool/run()`` starts.
            ///
            /// - Precondition: `count > 0`.
            public static func fixed(_ count: Int) -> Workers {
                precondition(count > 0, "WorkerPool.Configuration.Workers.fixed(_:): the worker count must be greater than 0, got \(count)")
                return Workers(base: .fixed(count))
            }

            /// At least `min` workers (started with ``WorkerPool/run()``) and at most `max`: a
            /// worker is started when a job is queued and no worker is idle, and a worker above
            /// `min` exits after `idleTimeout` without work.
            ///
            /// - Precondition: `0 <= min <= max`, `max > 0`, `idleTimeout > .zero`.
            public static func elastic(min: Int, max: Int, idleTimeout: Duration) -> Workers {
                precondition(min >= 0, "WorkerPool.Configuration.Workers.elastic: min must be 0 or more, got \(min)")
                precondition(max > 0, "WorkerPool.Configuration.Workers.elastic: max must be greater than 0, got \(max)")
                precondition(min <= max, "WorkerPool.Configuration.Workers.elastic: min (\(min)) must not exceed max (\(max))")
                precondition(idleTimeout > .zero, "WorkerPool.Configuration.Workers.elastic: idleTimeout must be greater than zero, got \(idleTimeout)")
                return Workers(base: .elastic(min: min, max: max, idleTimeout: idleTimeout))
            }

            /// The workers started with the pool.
            var minimum: Int {
                switch base {
                case .fixed(let count): count
                case .elastic(let min, _, _): min
                }
            }

            /// The most workers the pool runs.
            var maximum: Int {
                switch base {
                case .fixed(let count): count
                case .elastic(_, let max, _): max
                }
            }

            /// How long a worker above the minimum stays idle before it exits; `nil` for a
            /// fixed pool.
            var idleTimeout: Duration? {
                switch base {
                case .fixed: nil
                case .elastic(_, _, let idleTimeout): idleTimeout
                }
            }

            /// `fixed(n)` or `elastic(min:max:idleTimeout:)`.
            public var description: String {
                switch base {
                case .fixed(let count): "fixed(\(count))"
                case .elastic(let min, let max, let idleTimeout): "elastic(min: \(min), max: \(max), idleTimeout: \(idleTimeout))"
                }
            }
        }

        /// How many workers run the jobs.
        public var workers: Workers
        /// How many submitted jobs may wait in the pool's queue. Once the queue is full,
        /// ``WorkerPool/submit(_:)`` suspends and ``WorkerPool/trySubmit(_:)`` throws
        /// ``PoolError`` until it has drained to half this capacity. 0 means a job is accepted
        /// only when a worker is free to take it.
        ///
        /// Workers take queued jobs in batches — each at most its share of the queue, and at
        /// most 64 — so that short jobs cost one lock per batch rather than one per job. The
        /// jobs a worker has taken and not started yet still wait: they count against this
        /// capacity (and in ``WorkerPool/Stats/queued``), so what waits never exceeds it.
        ///
        /// - Precondition: `queueCapacity >= 0`, checked when it is set.
        public var queueCapacity: Int {
            didSet { Self.checkQueueCapacity(queueCapacity) }
        }
        /// The pool's name, used in diagnostics (``PoolError``, leak reports).
        public var name: String
        /// Told about every job that ran, with its times (for latency metrics); `nil` (the
        /// default) costs nothing, not even a clock reading.
        public var observer: (any WorkerPoolObserver)?

        /// Creates a configuration.
        ///
        /// - Precondition: `queueCapacity >= 0`.
        public init(
            workers: Workers,
            queueCapacity: Int,
            name: String = "WorkerPool",
            observer: (any WorkerPoolObserver)? = nil
        ) {
            Self.checkQueueCapacity(queueCapacity)
            self.workers = workers
            self.queueCapacity = queueCapacity
            self.name = name
            self.observer = observer
        }

        static func checkQueueCapacity(_ queueCapacity: Int) {
            precondition(queueCapacity >= 0, "WorkerPool.Configuration: queueCapacity must be 0 or more, got \(queueCapacity)")
        }
    }

    /// What a ``WorkerPoolObserver`` is told about a job that ran.
    public struct JobReport: Sendable {
        /// How a job that ran ended.
        public enum Outcome: Hashable, Sendable {
            /// It returned a value.
            case completed
            /// It threw an error other than a cancellation.
            case failed
            /// It was cancelled while it ran (through its handle, or by an immediate shutdown).
            case cancelled
        }

        /// How the job ended.
        public var outcome: Outcome
        /// The time from its acceptance to its start: its wait in the queue.
        public var waited: Duration
        /// The time it ran.
        public var ran: Duration
    }

    /// How ``WorkerPool/shutdown(_:)`` ends the pool.
    public struct ShutdownMode: Hashable, Sendable, CustomStringConvertible {
        @usableFromInline
        enum Base: Hashable, Sendable {
            case graceful(deadline: ContinuousClock.Instant?)
            case immediate
        }

        @usableFromInline let base: Base

        /// Stop accepting jobs, run every queued job, then let ``WorkerPool/run()`` return.
        public static var graceful: ShutdownMode { ShutdownMode(base: .graceful(deadline: nil)) }

        /// A graceful shutdown that becomes ``immediate`` if ``WorkerPool/run()`` has not
        /// returned by `deadline` (queued jobs not started are then rejected, and running ones
        /// cancelled).
        public static func graceful(deadline: ContinuousClock.Instant) -> ShutdownMode {
            ShutdownMode(base: .graceful(deadline: deadline))
        }

        /// A graceful shutdown that becomes ``immediate`` after `timeout`.
        public static func graceful(timeout: Duration) -> ShutdownMode {
            .graceful(deadline: .now + timeout)
        }

        /// Stop accepting jobs, cancel the running jobs, and fail every queued job's handle with
        /// ``PoolError`` (code `.shutdown`).
        public static var immediate: ShutdownMode { ShutdownMode(base: .immediate) }

        /// The mode's name.
        public var description: String {
            switch base {
            case .graceful(nil): "graceful"
            case .graceful(let deadline?): "graceful(deadline: \(deadline))"
            case .immediate: "immediate"
            }
        }
    }

    /// A snapshot of a pool's counters.
    ///
    /// Every job the pool accepted ends in exactly one of completed, failed, cancelled and
    /// rejected: once ``WorkerPool/run()`` has returned,
    /// `submitted == completed + failed + cancelled + rejected`.
    public struct Stats: Hashable, Sendable, CustomStringConvertible {
        /// Live workers.
        public var workers = 0
        /// Workers running a job.
        public var busy = 0
        /// Workers waiting for a job.
        public var idle = 0
        /// Jobs waiting for a worker: in the queue, or taken by a worker in a batch and not
        /// started yet.
        public var queued = 0
        /// Jobs accepted.
        public var submitted = 0
        /// Jobs that returned a value.
        public var completed = 0
        /// Jobs that threw an error other than a cancellation.
        public var failed = 0
        /// Jobs cancelled: through their handle (before or while running), or while running by
        /// an immediate shutdown or the cancellation of ``WorkerPool/run()``'s task.
        public var cancelled = 0
        /// Jobs accepted but never started because of an immediate shutdown (their handles
        /// throw ``PoolError``).
        public var rejected = 0
        /// Submissions refused without being accepted: the queue was full (`trySubmit`) or the
        /// pool was shut down.
        public var refused = 0
        /// The most jobs that waited at once.
        public var peakQueued = 0
        /// The most workers busy at once.
        public var peakBusy = 0

        /// Creates empty counters.
        public init() {}

        /// Jobs accepted and not yet ended.
        public var unfinished: Int { submitted - completed - failed - cancelled - rejected }

        /// The counters on one line.
        public var description: String {
            "workers \(workers) (busy \(busy), idle \(idle)), queued \(queued), submitted \(submitted), completed \(completed), failed \(failed), cancelled \(cancelled), rejected \(rejected), refused \(refused), peak queued \(peakQueued), peak busy \(peakBusy)"
        }
    }
}
