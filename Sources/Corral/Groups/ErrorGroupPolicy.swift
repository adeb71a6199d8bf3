/// What an error group does when one of its tasks throws.
///
/// A struct with static members rather than an enum, so that policies can be added without
/// breaking code that switches over them.
public struct ErrorGroupPolicy: Hashable, Sendable, CustomStringConvertible {
    @usableFromInline
    enum Base: Hashable, Sendable {
        case cancelAll
        case collectAll
    }

    @usableFromInline let base: Base

    @usableFromInline
    init(base: Base) {
        self.base = base
    }

    /// The first error cancels every other task (and makes further `addTask` calls throw);
    /// the group throws that first error — not a `CancellationError` it caused. Go's
    /// `errgroup.WithContext`.
    public static var cancelAll: ErrorGroupPolicy { ErrorGroupPolicy(base: .cancelAll) }

    /// Every task runs to completion whatever the others do; the group throws
    /// ``ErrorGroupFailure`` holding every error, in the order they were thrown.
    public static var collectAll: ErrorGroupPolicy { ErrorGroupPolicy(base: .collectAll) }

    /// The policy's name.
    public var description: String {
        switch base {
        case .cancelAll: "cancelAll"
        case .collectAll: "collectAll"
        }
    }
}
