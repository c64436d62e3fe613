package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"sinc.dev/sinc"
)

func kindOf(message bool) sinc.Kind {
	if message {
		return sinc.Message
	}
	return sinc.Stream
}

func runDial(args []string, stdout, stderr io.Writer) error {
	fs := newFlags("dial", stderr)
	socket := fs.String("socket", "", "the partition socket (default $SINC_SOCKET)")
	message := fs.Bool("message", false, "open a message channel: one line of input is one message")
	timeout := fs.Duration("timeout", 10*time.Second, "how long the open may take")
	pos, err := parse(fs, args, 1)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	d := &sinc.Dialer{Socket: *socket, Kind: kindOf(*message)}
	c, err := d.DialContext(ctx, pos[0])
	if err != nil {
		return err
	}
	defer c.Close()
	return pipe(c, os.Stdin, stdout)
}

// pipe copies in to the channel and the channel to out until the channel's
// other side ends (netcat's way: the end of in closes only the write side).
func pipe(c *sinc.Conn, in io.Reader, out io.Writer) error {
	sent := make(chan error, 1)
	go func() { sent <- send(c, in) }()
	if err := receive(c, out); err != nil {
		return err
	}
	select {
	case err := <-sent:
		return err
	default:
		return nil // the other side is done; input still open does not matter
	}
}

// send copies r to the channel, a line a message on a message channel, and
// then closes the channel's write side.
func send(c *sinc.Conn, r io.Reader) error {
	var err error
	if c.Kind() == sinc.Message {
		sc := bufio.NewScanner(r)
		sc.Buffer(make([]byte, sinc.MaxMessage), sinc.MaxMessage)
		for sc.Scan() && err == nil {
			err = c.WriteMessage(sc.Bytes())
		}
		if err == nil {
			err = sc.Err()
		}
	} else {
		_, err = io.Copy(c, r)
	}
	if err != nil {
		return err
	}
	return c.CloseWrite()
}

// receive copies the channel to w, a message a line on a message channel,
// until the other side's end.
func receive(c *sinc.Conn, w io.Writer) error {
	var err error
	if c.Kind() == sinc.Message {
		for {
			m, rerr := c.ReadMessage()
			if rerr != nil {
				err = rerr
				break
			}
			if _, err = fmt.Fprintf(w, "%s\n", m); err != nil {
				break
			}
		}
	} else {
		_, err = io.Copy(w, c)
	}
	if errors.Is(err, io.EOF) {
		return nil
	}
	return err
}

func runListen(args []string, stdout, stderr io.Writer) error {
	fs := newFlags("listen", stderr)
	socket := fs.String("socket", "", "the partition socket (default $SINC_SOCKET)")
	command := fs.String("exec", "", "run this shell command for each channel, its stdin and stdout joined to the channel; keep listening")
	pos, err := parse(fs, args, 1)
	if err != nil {
		return err
	}
	lc := &sinc.ListenConfig{Socket: *socket}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	l, err := lc.Listen(ctx, pos[0])
	cancel()
	if err != nil {
		return err
	}
	defer l.Close()
	fmt.Fprintf(stderr, "listening on %s\n", l.Addr())
	if *command == "" {
		c, err := l.AcceptSinc()
		if err != nil {
			return err
		}
		defer c.Close()
		return pipe(c, os.Stdin, stdout)
	}
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	go func() { <-sigs; l.Close() }()
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		c, err := l.AcceptSinc()
		if err != nil {
			return nil // closed by a signal, or the agent went away
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer c.Close()
			if err := serveExec(c, *command); err != nil {
				fmt.Fprintf(stderr, "sinc listen: %s: %v\n", c.RemoteAddr(), err)
			}
		}()
	}
}

// serveExec runs command with the channel as its stdin and stdout: what the
// channel brings goes to its stdin (closed at the channel's end), and all it
// writes goes back before the channel's write side closes.
func serveExec(c *sinc.Conn, command string) error {
	cmd := exec.Command("/bin/sh", "-c", command)
	info := c.Info()
	cmd.Env = append(os.Environ(),
		"SINC_REMOTE="+info.RemoteNode+"/"+info.RemotePartition,
		fmt.Sprintf("SINC_REMOTE_UID=%d", info.RemoteProcess.UID),
		fmt.Sprintf("SINC_CONN_ID=%d", info.ID))
	in, err := cmd.StdinPipe()
	if err != nil {
		return err
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return err
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		return err
	}
	fed := make(chan error, 1)
	go func() {
		err := receive(c, in)
		in.Close()
		fed <- err
	}()
	serr := send(c, out) // to the command's end of output
	werr := cmd.Wait()
	c.Close() // the command is gone: stop feeding it
	ferr := <-fed
	for _, err := range []error{serr, werr, ferr} {
		if err != nil && !errors.Is(err, os.ErrClosed) && !errors.Is(err, net.ErrClosed) && !errors.Is(err, syscall.EPIPE) {
			return err
		}
	}
	return nil
}
