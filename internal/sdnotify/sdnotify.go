// Package sdnotify implements the sending side of the systemd notify
// protocol (sd_notify(3)): datagrams such as "READY=1" to $NOTIFY_SOCKET.
package sdnotify

import (
	"net"
	"os"
)

// Notify sends state to $NOTIFY_SOCKET. It does nothing (and returns nil)
// when the variable is unset, as sd_notify does.
func Notify(state string) error {
	path := os.Getenv("NOTIFY_SOCKET")
	if path == "" {
		return nil
	}
	if path[0] == '@' { // abstract namespace
		path = "\x00" + path[1:]
	}
	conn, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		return err
	}
	defer conn.Close()
	_, err = conn.Write([]byte(state))
	return err
}
