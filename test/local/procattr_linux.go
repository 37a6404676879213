package local

import "syscall"

// childAttr kills a control-plane process if the local cluster dies
// without cleaning up.
func childAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
