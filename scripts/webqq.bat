@echo off
rem webqq for Windows, for when .py files don't open with Python: double-click this file.
rem It starts webqq.py (in the folder above, or next to this file) with the Python launcher
rem or python.exe, passing any arguments on: webqq.bat --init-config, webqq.bat -c my.ini
setlocal
set "WEBQQ=%~dp0..\webqq.py"
if not exist "%WEBQQ%" set "WEBQQ=%~dp0webqq.py"
set "PYTHON="
where py >nul 2>nul && set "PYTHON=py -3"
if not defined PYTHON where python >nul 2>nul && set "PYTHON=python"
if not defined PYTHON (
    echo Python 3 was not found. Install it from https://www.python.org/downloads/
    echo and tick "Add python.exe to PATH", then start webqq again.
    pause
    exit /b 1
)
%PYTHON% "%WEBQQ%" %*
set "STATUS=%ERRORLEVEL%"
rem Keep the window open after an error, so that it can be read (webqq.py printed a hint).
if not "%STATUS%"=="0" pause
exit /b %STATUS%
