#if canImport(Darwin)
import Darwin
#elseif canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// How long Corral polls before it suspends a task, where that is worth it.
@usableFromInline
enum Spinning {
    /// Polls of the fast path before suspending: about a few hundred nanoseconds, less than
    /// the cost of one suspension and resumption.
    @usableFromInline static let attempts = 100

    /// Spinning helps only if another processor can release what we wait for meanwhile.
    @usableFromInline static let isUseful: Bool = sysconf(Int32(_SC_NPROCESSORS_ONLN)) > 1
}
