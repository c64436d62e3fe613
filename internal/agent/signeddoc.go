package agent

import (
	"time"
)

// The CA's signed documents: the revocation list (revoke.go) and, with a
// registry, the cluster policy (policydoc.go). Each carries a serial, and
// the agent keeps the newest it has verified in force, with a copy in its
// state folder so that a restart does not forget it. Whatever the source
// — a file, the registry, the stored copy — a document goes through
// newerDoc:
//
//	newer      put in force, the copy rewritten (atomically)
//	same       serial and the same bytes: nothing to do
//	older      refused, with a log line naming both serials
//	other bytes under the serial in force: refused, logged as suspicious
//	           (the CA signed two documents under one serial, or someone
//	           else holds its key)
//
// So whoever can write the file or the registry key can delay a document,
// never take one back.

// docVersion is what the log says of a document: its serial and issue time.
type docVersion struct {
	serial uint64
	issued time.Time
}

// newerDoc says whether a verified document of kind ("revocation list",
// "cluster policy") from source replaces the one in force, given their
// order (c, err: the document's Compare with the one in force); it logs
// the refusals.
func (a *Agent) newerDoc(kind, source string, c int, err error, doc, in docVersion) bool {
	switch {
	case err != nil:
		a.log.Error(kind+" refused: other content under the serial in force (suspicious: the CA signed two under one serial, or its key is not its own); the one in force stays",
			"source", source, "serial", doc.serial, "issued", doc.issued, "in_force_serial", in.serial, "in_force_issued", in.issued)
		return false
	case c < 0:
		a.log.Error(kind+" refused: older than the one in force, which stays",
			"source", source, "serial", doc.serial, "issued", doc.issued, "in_force_serial", in.serial, "in_force_issued", in.issued)
		return false
	}
	return c > 0
}
