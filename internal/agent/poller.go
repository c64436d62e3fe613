package agent

import (
	"errors"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// poller starts a channel's outbound pump when the process's socket has
// something to read, so that an idle channel holds no goroutine (and no
// stack): a pump that finds the socket empty at a record boundary arms the
// socket here and ends. The sockets are in an epoll set of their own, one
// shot each (armed again only by the pump that ends), level triggered (a
// socket armed while readable fires at once, so nothing sent between the
// pump's last read and the arming is missed). The epoll descriptor itself
// waits in the runtime's poller: no thread blocks on it.
type poller struct {
	a  *Agent
	f  *os.File // the epoll descriptor
	rc syscall.RawConn
}

func newPoller(a *Agent) (*poller, error) {
	fd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, os.NewSyscallError("epoll_create1", err)
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return nil, os.NewSyscallError("fcntl", err)
	}
	f := os.NewFile(uintptr(fd), "epoll")
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil, err
	}
	return &poller{a: a, f: f, rc: rc}, nil
}

// arm asks for ch's outbound pump to be started once its socket is
// readable (or closed, or in error).
func (p *poller) arm(ch *channel) error {
	if p == nil {
		return errors.New("no channel poller")
	}
	return p.add(ch.sock, ch.id)
}

// roomTag marks the events of a ring's room pipe (ring.go) in the
// channel id an event carries: ids never reach it.
const roomTag = 1 << 63

// armRoom asks for ringRoom to run once the process made room in a ring
// channel's ring down.
func (p *poller) armRoom(ch *channel) error {
	if p == nil {
		return errors.New("no channel poller")
	}
	return p.ctl(ch.ring.downRoom, ch.id|roomTag)
}

// add arms conn's descriptor, one shot, for the event tag.
func (p *poller) add(conn syscall.Conn, tag uint64) error {
	src, err := conn.SyscallConn()
	if err != nil {
		return err
	}
	var cerr error
	if err := src.Control(func(sfd uintptr) { cerr = p.ctl(int(sfd), tag) }); err != nil {
		return err
	}
	return cerr
}

// ctl arms fd, one shot, for the event tag; the caller keeps fd open
// meanwhile.
func (p *poller) ctl(fd int, tag uint64) error {
	ev := unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLRDHUP | unix.EPOLLONESHOT}
	ev.Fd, ev.Pad = int32(uint32(tag)), int32(uint32(tag>>32))
	var cerr error
	err := p.rc.Control(func(efd uintptr) {
		cerr = unix.EpollCtl(int(efd), unix.EPOLL_CTL_MOD, fd, &ev)
		if errors.Is(cerr, unix.ENOENT) {
			cerr = unix.EpollCtl(int(efd), unix.EPOLL_CTL_ADD, fd, &ev)
		}
	})
	if err != nil {
		return err
	}
	return os.NewSyscallError("epoll_ctl", cerr)
}

// run starts the pumps of the sockets that became readable, until close.
func (p *poller) run() {
	events := make([]unix.EpollEvent, 128)
	for {
		var n int
		var werr error
		err := p.rc.Read(func(fd uintptr) bool {
			n, werr = unix.EpollWait(int(fd), events, 0)
			return n > 0 || (werr != nil && werr != unix.EINTR)
		})
		if err != nil {
			return // closed
		}
		if werr != nil {
			p.a.log.Error("channel poller failed; idle channels will not send", "err", werr)
			return
		}
		for _, ev := range events[:n] {
			tag := uint64(uint32(ev.Fd)) | uint64(uint32(ev.Pad))<<32
			switch ch := p.a.tables.lookupID(tag &^ roomTag); {
			case ch == nil || ch.ended.Load():
			case tag&roomTag != 0:
				p.a.goRun(ch.ringRoom)
			case ch.ring != nil:
				p.a.goRun(ch.ringOutbound)
			default:
				p.a.goRun(ch.outbound)
			}
		}
	}
}

func (p *poller) close() { p.f.Close() }
