/// Thrown by ``TaskTracker/spawn(priority:_:)`` when the tracker no longer accepts tasks.
public struct TaskTrackerError: Error, Hashable, Sendable, CustomStringConvertible {
    /// What went wrong.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        fileprivate enum Base: Hashable, Sendable {
            case closed
        }
        fileprivate let base: Base

        /// The tracker was closed before the task could be started.
        public static var closed: Code { Code(base: .closed) }

        /// The code's name.
        public var description: String {
            switch base {
            case .closed: "closed"
            }
        }
    }

    /// What went wrong.
    public let code: Code
    /// The tracker's name.
    public let trackerName: String

    /// The tracker `name` was closed before the task could be started.
    public static func closed(name: String) -> TaskTrackerError {
        TaskTrackerError(code: .closed, trackerName: name)
    }

    /// A readable description naming the tracker.
    public var description: String {
        switch code.base {
        case .closed: "TaskTrackerError.closed: TaskTracker \"\(trackerName)\" is closed; the task was not started"
        }
    }
}
