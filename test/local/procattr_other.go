//go:build !linux

package local

import "syscall"

func childAttr() *syscall.SysProcAttr { return &syscall.SysProcAttr{} }
