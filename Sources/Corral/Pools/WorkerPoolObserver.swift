/// Told about every job a ``WorkerPool`` ran, with its times — the hook for latency metrics
/// (CorralServices' `CorralMetrics.jobObserver(pool:)` records them as histograms).
///
/// Set it in ``WorkerPool/Configuration/observer``.
public protocol WorkerPoolObserver: Sendable {
    /// A job ended after running. Called on the job's worker, after the job and before the
    /// worker takes its next one: keep it short and non-blocking.
    func jobEnded(_ job: WorkerPool.JobReport)
}
